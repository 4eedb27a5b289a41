"""The RULER-style text tasks: seeded examples, prompts built to an exact token count with
each needle where its depth says, and RULER's scoring."""

from __future__ import annotations

import pytest

from longctx.data.errors import DataError
from longctx.data.text_tasks import (NOISE, TEXT_TASKS, build_prompt, make_example, score, stdlib_sentences,
                                     task_options)
from longctx.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _text(prompt, span):
    return TOK.decode(prompt.ids[span[0] : span[1]])


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_examples_are_seeded_and_answers_are_in_the_needles(task):
    a, b = make_example(task, 0.5, seed=7), make_example(task, 0.5, seed=7)
    assert a == b and a != make_example(task, 0.5, seed=8)
    needles = " ".join(a.needles)
    assert all(answer in needles for answer in a.answers)
    if task == "niah_multikey":
        assert len(a.needles) == 4 and sum(a.answers[0] in n for n in a.needles) == 1  # distractors differ
    if task == "variable_tracking":
        assert len(a.answers) == 5 and a.needles[0].endswith(f"= {a.question.split()[-5]}.")


@pytest.mark.parametrize("task", TEXT_TASKS)
@pytest.mark.parametrize("length", [600, 1000, 1777])
def test_prompts_have_exactly_the_length_and_hold_every_needle(task, length):
    example = make_example(task, 0.3, seed=length)
    prompt = build_prompt(example, TOK, length)
    assert len(prompt.ids) == length
    for needle, span in zip(example.needles, prompt.needle_spans):
        assert _text(prompt, span).strip() == needle
    text = TOK.decode(prompt.ids)
    assert text.startswith(example.intro) and text.endswith(f"{example.question} {example.answer_prefix}")
    lo, hi = prompt.context
    assert lo <= min(s for s, _ in prompt.needle_spans) and max(e for _, e in prompt.needle_spans) <= hi


@pytest.mark.parametrize("haystack", ["noise", "stdlib"])
def test_needles_sit_at_their_depth(haystack):
    """Needle start as a fraction of the haystack grows with the depth, within one sentence."""
    length = 3000
    where = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        example = make_example("passkey_text", depth, seed=3, haystack=haystack)
        prompt = build_prompt(example, TOK, length)
        (start, end), (lo, hi) = prompt.needle_spans[0], prompt.context
        fraction = (start - lo) / (hi - lo - (end - start))
        slack = 400 / (hi - lo)  # a haystack sentence is at most 400 characters (bytes here)
        assert abs(fraction - depth) <= slack, (depth, fraction)
        where.append(start)
    assert where == sorted(where) and where[0] == prompt.context[0]


def test_real_text_haystack_is_the_standard_library_docstrings():
    sentences = stdlib_sentences()
    assert len(sentences) >= 100 and all(len(s) <= 400 for s in sentences)
    prompt = build_prompt(make_example("niah", 0.5, seed=1), TOK, 2000)
    assert NOISE not in TOK.decode(prompt.ids)
    noise = build_prompt(make_example("passkey_text", 0.5, seed=1), TOK, 2000)
    assert TOK.decode(noise.ids).count(NOISE) > 10


def test_score_is_the_fraction_of_answers_found_ignoring_case():
    assert score("The number is 1234567.", ["1234567"]) == 1.0
    assert score("the number is 123456", ["1234567"]) == 0.0
    assert score("ABCDE and fghij", ["abcde", "FGHIJ", "KLMNO", "PQRST"]) == 0.5


def test_bad_options_and_lengths_are_refused():
    with pytest.raises(DataError, match="unknown text task 'needle'"):
        task_options("needle")
    with pytest.raises(DataError, match="niah has no option\\(s\\) hops"):
        make_example("niah", 0.5, seed=0, hops=2)
    with pytest.raises(DataError, match="digits must be an integer >= 1"):
        make_example("passkey_text", 0.5, seed=0, digits=0)
    with pytest.raises(DataError, match="haystack must be one of noise, stdlib"):
        make_example("passkey_text", 0.5, seed=0, haystack="lorem")
    with pytest.raises(DataError, match="depth must be in \\[0, 1\\]"):
        make_example("passkey_text", 1.5, seed=0)
    with pytest.raises(DataError, match="length 50 is too short for passkey_text"):
        build_prompt(make_example("passkey_text", 0.5, seed=0), TOK, 50)

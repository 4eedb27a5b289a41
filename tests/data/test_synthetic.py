"""Synthetic tasks: seeded, exactly the documented layout, and every answer recoverable
from the input by the rule the task defines (solved here by plain Python)."""

import pytest
import torch

from longctx.data import DataError
from longctx.data.synthetic import (ADDITION_EQUALS, ADDITION_NOISE, ADDITION_PLUS, IGNORE, TASKS, make_batch,
                                    passkey_min_length)


def asked(targets):
    return targets != IGNORE


@pytest.mark.parametrize("task,length", [("selective_copying", 64), ("induction", 33), ("mqar", 97),
                                         ("passkey", 300), ("addition", 20)])
def test_seeded_and_shaped(task, length):
    options = {"mqar": {"vocab": 64, "pairs": 8}}.get(task, {})
    a = make_batch(task, 5, length, seed=3, **options)
    b = make_batch(task, 5, length, seed=3, **options)
    c = make_batch(task, 5, length, seed=4, **options)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    inputs, targets = a
    assert inputs.shape == targets.shape == (5, length) and inputs.dtype == torch.long
    assert asked(targets).any(dim=1).all()


def test_selective_copying_answers_are_the_data_tokens_in_order():
    inputs, targets = make_batch("selective_copying", 8, 100, vocab=16, n_tokens=6, seed=1)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        assert x[-6:] == [15] * 6
        data = [t for t in x[:-6] if t != 0]
        assert len(data) == 6 and all(1 <= t <= 14 for t in data)
        assert [t for t in y if t != IGNORE] == data and y[:-6] == [IGNORE] * 94


def test_induction_answer_follows_the_only_earlier_trigger():
    inputs, targets = make_batch("induction", 16, 50, vocab=16, seed=2)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        where = [i for i, t in enumerate(x) if t == 15]
        assert len(where) == 2 and where[1] == 49 and where[0] < 48
        assert y[49] == x[where[0] + 1] and y[:49] == [IGNORE] * 49


def test_mqar_queries_ask_for_their_values():
    inputs, targets = make_batch("mqar", 8, 60, vocab=64, pairs=5, seed=3)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        table = dict(zip(x[0:10:2], x[1:10:2]))
        assert len(table) == 5 and all(1 <= k < 32 <= v < 64 for k, v in table.items())
        queries = [(t, y[i]) for i, t in enumerate(x[10:], start=10) if t != 0]
        assert sorted(k for k, _ in queries) == sorted(table) and all(table[k] == v for k, v in queries)
        assert sum(v != IGNORE for v in y) == 5


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_text_and_answer(depth):
    inputs, targets = make_batch("passkey", 3, 400, depth=depth, seed=4)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        text = bytes(x).decode()
        key = text.split("The pass key is ")[1][:5]
        assert key.isdigit() and text.endswith("The pass key is " + key[:4])
        assert bytes(v for v in y if v != IGNORE).decode() == key
        note = text.index("The pass key is")
        assert abs(note / (400 - 100) - depth) < 0.35  # where the depth puts it, to a sentence
    shortest = passkey_min_length()
    assert make_batch("passkey", 1, shortest)[0].shape == (1, shortest)


def test_bad_input_is_named():
    with pytest.raises(DataError, match="unknown task 'copy'; choose one of " + ", ".join(TASKS)):
        make_batch("copy", 1, 10)
    with pytest.raises(DataError, match="needs length >= 32"):
        make_batch("selective_copying", 1, 31)
    with pytest.raises(DataError, match="pairs < vocab / 2"):
        make_batch("mqar", 1, 100, vocab=16, pairs=8)
    with pytest.raises(DataError, match="needs length >= "):
        make_batch("passkey", 1, 20)
    with pytest.raises(DataError, match="depth must be in"):
        make_batch("passkey", 1, 500, depth=1.5)
    with pytest.raises(DataError, match="bad options for task 'induction'"):
        make_batch("induction", 1, 10, pairs=3)


@pytest.mark.parametrize("digits, length", [(1, 5), (4, 14), (6, 40)])
def test_addition_asks_the_sum_most_significant_digit_first(digits, length):
    inputs, targets = make_batch("addition", 16, length, digits=digits, seed=2)
    shortest = 3 * digits + 2
    assert (inputs[:, : length - shortest] == ADDITION_NOISE).all()
    for row, target in zip(inputs.tolist(), targets.tolist()):
        problem = row[length - shortest :]
        assert problem[digits] == ADDITION_PLUS and problem[2 * digits + 1] == ADDITION_EQUALS
        a = int("".join(map(str, problem[:digits])))
        b = int("".join(map(str, problem[digits + 1 : 2 * digits + 1])))
        answer = [t for t in target if t != IGNORE]
        assert answer == [int(c) for c in str(a + b).zfill(digits + 1)]
        # Answered from '=' on; every later input is the answer digit asked before it.
        assert target.index(answer[0]) == length - digits - 1 and problem[2 * digits + 2 :] == answer[:-1]


def test_addition_bad_input_is_named():
    with pytest.raises(DataError, match="addition of 4-digit numbers needs length >= 14"):
        make_batch("addition", 1, 13)
    with pytest.raises(DataError, match="digits must be in 1..18"):
        make_batch("addition", 1, 100, digits=0)

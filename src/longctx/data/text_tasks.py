"""Text retrieval tasks for pretrained models, in the style of RULER (Hsieh et al. 2024):
seeded generators of examples, and a builder that fills an example to an exact number of
the model's tokens.

The tasks (named apart from the token-level tasks of ``longctx.data.synthetic``):

- ``passkey_text`` (RULER's ``niah_single_1``): the noise haystack "The grass is green. The
  sky is blue. The sun is yellow. Here we go. There and back again.", repeated one per
  line, with one needle "One of the special magic numbers for {key} is: {value}."; the
  question asks for the number of ``key``.  Keys are adjective-noun pairs
  ("quiet-harbor"), values numbers of ``digits`` digits (7, as RULER's).
- ``niah`` (``niah_single_2``): the same needle in real text: sentences of the docstrings
  of the Python standard library's top-level modules (read from its source with ``ast``,
  so nothing is downloaded), from a seeded starting sentence on, wrapping around.
- ``niah_multikey`` (``niah_multikey_1``): ``niah`` plus ``distractors`` (3) needles with
  other keys and values at seeded random depths; the question asks for one key.
- ``variable_tracking`` (``vt``): a chain "VAR QXKWZ = 48213." then ``hops`` (4)
  assignments "VAR BNTRA = VAR QXKWZ." ... in the noise haystack; the question asks for
  every variable that holds the value: the ``hops + 1`` names are the answers.

Prompts are RULER's: the intro, the haystack, the question, and the answer prefix (for
``niah``: "The special magic number for {key} mentioned in the provided text is"), which
starts the assistant's reply when a chat template wraps the rest as the user's message.
RULER's single-needle wording is used ("A special magic number is hidden ...").  RULER's
variable tracking also puts a worked example (about 500 tokens) before the task; here it
does not, so that the task fits short lengths.

Depth is where a needle sits in the haystack, counted in haystack tokens: 0 before the
first haystack sentence, 1 after the last, snapped to the nearest sentence boundary.
For ``variable_tracking`` the depth is that of the first statement (the value); the hops
follow in order at seeded depths within the next ``spread`` (0.1) of the haystack.

Length is the number of tokens of the whole prompt, chat template and answer prefix
included: ``build_prompt`` tokenizes the fixed parts, then fills the rest with haystack
sentences, cutting the first one at its start so that the count is exact.  Pieces are
tokenized apart (each sentence with its leading separator), which for BPE tokenizers
gives the tokens of the joined text up to the seams.

Scoring is RULER's ``string_match_all``: the fraction of the expected strings that occur,
ignoring case, in the model's answer (``score``).
"""

from __future__ import annotations

import ast
import functools
import random
import re
import string
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longctx.validation import check

from .errors import DataError

TEXT_TASKS = ("passkey_text", "niah", "niah_multikey", "variable_tracking")
HAYSTACKS = ("noise", "stdlib")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_INTRO = ("A special magic number is hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the number afterwards.")
NIAH_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
NIAH_ANSWER = "The special magic number for {key} mentioned in the provided text is"
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = ("Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {value}, they are:")
# Each task's options and their defaults.
TASK_OPTIONS: dict[str, dict[str, object]] = {
    "passkey_text": {"digits": 7, "haystack": "noise"},
    "niah": {"digits": 7, "haystack": "stdlib"},
    "niah_multikey": {"digits": 7, "haystack": "stdlib", "distractors": 3},
    "variable_tracking": {"hops": 4, "spread": 0.1, "haystack": "noise"},
}
# Tokens a greedy answer may take: a 7-digit number is up to 8 tokens, 5 variable names about 25.
MAX_NEW_TOKENS = {"passkey_text": 20, "niah": 20, "niah_multikey": 20, "variable_tracking": 40}

_ADJECTIVES = ("amber", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "dusty", "eager",
               "faint", "fierce", "gentle", "golden", "hidden", "hollow", "humble", "icy", "jolly", "keen",
               "lively", "lonely", "lucky", "mellow", "misty", "narrow", "noble", "olive", "pale", "proud",
               "quiet", "rapid", "restless", "rusty", "silent", "silver", "sleepy", "smooth", "solemn", "steady",
               "stormy", "sunny", "swift", "tender", "tidy", "velvet", "wandering", "wild", "wise", "young")
_NOUNS = ("anchor", "badger", "banner", "basket", "beacon", "bridge", "candle", "canyon", "castle", "cellar",
          "comet", "compass", "cottage", "crystal", "dragon", "falcon", "feather", "forest", "fountain", "garden",
          "glacier", "harbor", "hammer", "island", "jungle", "kettle", "lantern", "meadow", "mirror", "monarch",
          "mountain", "needle", "orchard", "otter", "palace", "pebble", "pillar", "planet", "quarry", "river",
          "saddle", "shadow", "signal", "spider", "thunder", "tower", "valley", "violin", "walrus", "willow")


@dataclass(frozen=True)
class TextExample:
    """One example, tokenizer-agnostic: the user's message is ``intro``, the haystack with the
    ``needles`` inserted at their ``depths``, and ``question``; the reply starts with
    ``answer_prefix``; ``answers`` are the strings a correct reply contains."""

    task: str
    intro: str
    question: str
    answer_prefix: str
    needles: tuple[str, ...]
    depths: tuple[float, ...]
    answers: tuple[str, ...]
    haystack: str
    haystack_seed: int


@dataclass(frozen=True)
class TextPrompt:
    """An example built to a length: ``ids`` (exactly the length), the token span
    ``[start, end)`` of each needle (in the order of ``TextExample.needles``) and of the
    haystack with its needles (``context``)."""

    ids: list[int]
    needle_spans: tuple[tuple[int, int], ...]
    context: tuple[int, int]


def task_options(task: str, options: dict | None = None) -> dict[str, object]:
    """The task's options: its defaults updated with ``options``; unknown names and bad values
    raise ``DataError``."""
    check(task in TASK_OPTIONS, f"unknown text task {task!r}; choose one of {', '.join(TEXT_TASKS)}", DataError)
    out = dict(TASK_OPTIONS[task])
    unknown = sorted(set(options or {}) - set(out))
    check(not unknown, f"{task} has no option(s) {', '.join(unknown)}; its options: {', '.join(out)}", DataError)
    out.update(options or {})
    check(out["haystack"] in HAYSTACKS, f"haystack must be one of {', '.join(HAYSTACKS)}; got {out['haystack']!r}",
          DataError)
    for name, low in (("digits", 1), ("hops", 1), ("distractors", 0)):
        if name in out:
            check(isinstance(out[name], int) and out[name] >= low, f"{name} must be an integer >= {low}; got "
                  f"{out[name]!r}", DataError)
    if "spread" in out:
        check(isinstance(out["spread"], (int, float)) and 0 <= out["spread"] <= 1,
              f"spread must be a number in [0, 1]; got {out['spread']!r}", DataError)
    return out


def make_example(task: str, depth: float, seed: int, **options) -> TextExample:
    """The example of ``task`` with its (first) needle at ``depth``, drawn from ``seed``: the
    same seed gives the same example on any machine."""
    opts = task_options(task, options)
    check(0.0 <= depth <= 1.0, f"depth must be in [0, 1]; got {depth}", DataError)
    rng = random.Random(seed)
    if task == "variable_tracking":
        names = _distinct(rng, lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), opts["hops"] + 1)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        hi = min(1.0, depth + opts["spread"])
        depths = (depth, *sorted(rng.uniform(depth, hi) for _ in names[1:]))
        return TextExample(task, VT_INTRO, VT_QUESTION.format(value=value),
                           VT_ANSWER.format(n=len(names), value=value), tuple(chain), depths, tuple(names),
                           opts["haystack"], rng.getrandbits(32))
    n = 1 + opts.get("distractors", 0)
    keys = _distinct(rng, lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}", n)
    values = _distinct(rng, lambda: str(rng.randint(10 ** (opts["digits"] - 1), 10 ** opts["digits"] - 1)), n)
    needles = tuple(NEEDLE.format(key=k, value=v) for k, v in zip(keys, values))
    depths = (depth, *(rng.random() for _ in keys[1:]))
    return TextExample(task, NIAH_INTRO, NIAH_QUESTION.format(key=keys[0]), NIAH_ANSWER.format(key=keys[0]),
                       needles, depths, (values[0],), opts["haystack"], rng.getrandbits(32))


def _distinct(rng: random.Random, draw: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def score(prediction: str, answers) -> float:
    """RULER's ``string_match_all`` for one answer: the fraction of ``answers`` that occur in
    ``prediction``, ignoring case."""
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


# ---------------------------------------------------------------------------------------
# Haystacks


@functools.lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """The sentences of the docstrings (module, class, function) of the standard library's
    top-level modules, in file-name order: the real-text haystack.  It depends on the Python
    version (3.11: about 9,000 sentences, 200,000 tokens of a 49K BPE vocabulary)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                               ast.AsyncFunctionDef)))
        docs += [d for d in map(ast.get_docstring, nodes) if d]
    text = re.sub(r"\s+", " ", " ".join(docs))
    sentences = tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if 3 <= len(s.split()) and len(s) <= 400)
    check(len(sentences) >= 100, f"the real-text haystack needs the standard library's source (.py files) in "
          f"{root}, which has too few; use haystack='noise'", DataError)
    return sentences


def _haystack_pieces(kind: str, seed: int):
    """Endless haystack pieces, each with its leading separator."""
    if kind == "noise":
        while True:
            yield "\n" + NOISE
    sentences = stdlib_sentences()
    i = random.Random(seed).randrange(len(sentences))
    while True:
        yield " " + sentences[i]
        i = (i + 1) % len(sentences)


def _fill(kind: str, seed: int, n_tokens: int, encode) -> list[list[int]]:
    """Haystack pieces of exactly ``n_tokens`` tokens in all: whole pieces, the first one cut
    at its start."""
    pieces, total, memo = [], 0, {}
    for text in _haystack_pieces(kind, seed):
        if total >= n_tokens:
            break
        if text not in memo:
            memo[text] = encode(text)
        pieces.append(memo[text])
        total += len(pieces[-1])
    excess = total - n_tokens
    while pieces and excess >= len(pieces[0]):
        excess -= len(pieces.pop(0))
    if pieces:
        pieces[0] = pieces[0][excess:]
    return pieces


def build_prompt(example: TextExample, tokenizer, length: int, *,
                 wrap: Callable[[str], str] | None = None) -> TextPrompt:
    """``example`` as ``length`` tokens of ``tokenizer`` (anything with ``encode``; with
    ``wrap``, also ``encode_with_specials``).

    ``wrap(user_message)`` renders the conversation up to where the assistant's reply starts
    (a chat template); the answer prefix follows it.  Without ``wrap`` the prompt is the
    message and the answer prefix as plain text, after bos when the tokenizer adds one."""
    mark = "\ue000"  # a private-use character: where the haystack goes
    user = f"{example.intro}\n{mark}\n{example.question}"
    if wrap is None:
        text, encode_fixed = f"{user} {example.answer_prefix}", tokenizer.encode
    else:
        text, encode_fixed = wrap(user) + example.answer_prefix, tokenizer.encode_with_specials
    check(text.count(mark) == 1, "the chat template changed the user's message, so the haystack cannot be placed "
          "in it; evaluate without the template", DataError)
    head_text, tail_text = text.split(mark)
    head, tail = encode_fixed(head_text), encode_fixed(tail_text)
    if wrap is None and getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
        head = [tokenizer.bos_id, *head]
    sep = "\n" if example.haystack == "noise" else " "
    needles = [tokenizer.encode(sep + n) for n in example.needles]
    fixed = len(head) + len(tail) + sum(map(len, needles))
    check(length >= fixed, f"length {length} is too short for {example.task}: the prompt without haystack takes "
          f"{fixed} tokens of this tokenizer; use lengths >= {fixed}", DataError)
    pieces = _fill(example.haystack, example.haystack_seed, length - fixed, tokenizer.encode)
    bounds = [0]
    for p in pieces:
        bounds.append(bounds[-1] + len(p))
    slot = [min(range(len(bounds)), key=lambda b: abs(bounds[b] - d * bounds[-1])) for d in example.depths]
    ids, spans = list(head), [None] * len(needles)
    for b in range(len(bounds)):
        for j in sorted((j for j in range(len(needles)) if slot[j] == b)):
            spans[j] = (len(ids), len(ids) + len(needles[j]))
            ids += needles[j]
        if b < len(pieces):
            ids += pieces[b]
    context = (len(head), len(ids))
    ids += tail
    assert len(ids) == length, (len(ids), length)
    return TextPrompt(ids, tuple(spans), context)


__all__ = ["HAYSTACKS", "MAX_NEW_TOKENS", "TASK_OPTIONS", "TEXT_TASKS", "TextExample", "TextPrompt",
           "build_prompt", "make_example", "score", "stdlib_sentences", "task_options"]

"""Synthetic long-context tasks: seeded generators of ``(inputs, targets)`` batches.

Every generator returns two int64 tensors ``(batch, length)``: ``inputs`` are the token
ids fed to the model, ``targets[b, t]`` is the token the model must output at position
``t`` (its next-token prediction there), or ``IGNORE`` where nothing is asked.  Accuracy
counts the asked positions only.  The same ``seed`` gives the same batch on any machine.

- ``selective_copying`` (Mamba, Gu & Dao 2023, App. E.1; from "Hungry Hungry Hippos"):
  ``n_tokens`` data tokens at random positions in a field of noise, then ``n_tokens``
  copy markers; at the i-th marker the model outputs the i-th data token.  Tokens: 0 is
  noise, ``vocab - 1`` the marker, ``1 .. vocab - 2`` data.  ``length`` counts everything.
- ``induction`` (Mamba App. E.1, Olsson et al. 2022): random tokens ``0 .. vocab - 2``;
  the trigger ``vocab - 1`` appears once, followed by a random value; the last token is
  the trigger again, and there the model outputs the value.
- ``mqar`` (multi-query associative recall, Arora et al. 2023, "Zoology"): ``pairs``
  key-value pairs (keys ``1 .. vocab/2 - 1``, values ``vocab/2 .. vocab - 1``, keys
  distinct), then every key once more in random order at random positions of a field of
  zeros; at each of them the model outputs the key's value.
- ``passkey`` (Mohtashami & Jaggi 2023): byte-level text.  Repeated filler with "The pass
  key is K. Remember it. K is the pass key." at a chosen depth (0 = start, 1 = end of the
  filler), ending in "What is the pass key? The pass key is K": the model outputs the
  digits of K (5 by default), each at the position before it.
- ``addition`` (multi-digit addition answered at once, a task where pause tokens may help:
  Goyal et al. 2023; Pfau et al. 2024): noise (``ADDITION_NOISE``) up to ``length``, then
  ``a + b =`` with ``digits``-digit operands, most significant digit first; the model
  outputs the ``digits + 1`` digits of the sum, most significant first (with a leading
  zero), each at the position before it.  The first digit depends on the carries of every
  column, and there is no room before it to work them out.  Tokens: 0-9 digits,
  ``ADDITION_PLUS``, ``ADDITION_EQUALS``, ``ADDITION_NOISE``; ``ADDITION_VOCAB`` in all.
"""

from __future__ import annotations

import torch

from longctx.validation import check, positive_int

from .errors import DataError

IGNORE = -100  # targets not asked (torch's cross_entropy ignore_index)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NOTE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is {key}"
ADDITION_PLUS, ADDITION_EQUALS, ADDITION_NOISE = 10, 11, 12
ADDITION_VOCAB = 13


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _check_batch(batch: int, length: int) -> None:
    positive_int("batch", batch, error=DataError)
    positive_int("length", length, error=DataError)


def selective_copying(batch: int, length: int, *, vocab: int = 16, n_tokens: int = 16, seed: int = 0):
    """``(inputs, targets)`` of the selective copying task; see the module docstring."""
    _check_batch(batch, length)
    check(vocab >= 3, f"selective copying needs vocab >= 3 (noise, marker, a data token); got {vocab}", DataError)
    check(n_tokens >= 1, f"n_tokens must be >= 1; got {n_tokens}", DataError)
    check(length >= 2 * n_tokens,
          f"selective copying of {n_tokens} tokens needs length >= {2 * n_tokens}; got {length}", DataError)
    g = _generator(seed)
    field = length - n_tokens
    data = torch.randint(1, vocab - 1, (batch, n_tokens), generator=g)
    # n_tokens distinct positions in the field, in increasing order: the copy order.
    where = torch.rand(batch, field, generator=g).argsort(dim=1)[:, :n_tokens].sort(dim=1).values
    inputs = torch.zeros(batch, length, dtype=torch.long)
    inputs.scatter_(1, where, data)
    inputs[:, field:] = vocab - 1
    targets = torch.full_like(inputs, IGNORE)
    targets[:, field:] = data
    return inputs, targets


def induction(batch: int, length: int, *, vocab: int = 16, seed: int = 0):
    """``(inputs, targets)`` of the induction-heads task; see the module docstring."""
    _check_batch(batch, length)
    check(vocab >= 3, f"induction needs vocab >= 3 (the trigger and two others); got {vocab}", DataError)
    check(length >= 3, f"induction needs length >= 3 (trigger, value, trigger); got {length}", DataError)
    g = _generator(seed)
    trigger = vocab - 1
    inputs = torch.randint(0, trigger, (batch, length), generator=g)
    where = torch.randint(0, length - 2, (batch,), generator=g)
    rows = torch.arange(batch)
    inputs[rows, where] = trigger
    value = inputs[rows, where + 1]
    inputs[:, -1] = trigger
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1] = value
    return inputs, targets


def mqar(batch: int, length: int, *, vocab: int = 8192, pairs: int = 16, seed: int = 0):
    """``(inputs, targets)`` of multi-query associative recall; see the module docstring."""
    _check_batch(batch, length)
    check(vocab >= 4 and vocab % 2 == 0, f"mqar needs an even vocab >= 4; got {vocab}", DataError)
    check(1 <= pairs < vocab // 2,
          f"mqar needs 1 <= pairs < vocab / 2 = {vocab // 2} (distinct keys); got {pairs}", DataError)
    check(length >= 3 * pairs, f"mqar with {pairs} pairs needs length >= {3 * pairs}; got {length}", DataError)
    g = _generator(seed)
    half = vocab // 2
    keys = torch.rand(batch, half - 1, generator=g).argsort(dim=1)[:, :pairs] + 1
    values = torch.randint(half, vocab, (batch, pairs), generator=g)
    inputs = torch.zeros(batch, length, dtype=torch.long)
    inputs[:, 0 : 2 * pairs : 2] = keys
    inputs[:, 1 : 2 * pairs : 2] = values
    field = length - 2 * pairs
    where = torch.rand(batch, field, generator=g).argsort(dim=1)[:, :pairs] + 2 * pairs
    order = torch.rand(batch, pairs, generator=g).argsort(dim=1)
    inputs.scatter_(1, where, keys.gather(1, order))
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, where, values.gather(1, order))
    return inputs, targets


def passkey_min_length(digits: int = 5) -> int:
    """The shortest passkey example: the note and the question with no filler."""
    key = "0" * digits
    return len((PASSKEY_NOTE + PASSKEY_QUESTION).format(key=key).encode()) - 1


def passkey(batch: int, length: int, *, depth: float = 0.5, digits: int = 5, seed: int = 0):
    """``(inputs, targets)`` of passkey retrieval in UTF-8 bytes (the byte tokenizer's ids);
    ``depth`` in [0, 1] places the note in the filler.  See the module docstring."""
    _check_batch(batch, length)
    check(0.0 <= depth <= 1.0, f"passkey depth must be in [0, 1]; got {depth}", DataError)
    check(1 <= digits <= 18, f"passkey digits must be in 1..18; got {digits}", DataError)
    shortest = passkey_min_length(digits)
    check(length >= shortest, f"passkey with {digits} digits needs length >= {shortest}; got {length}", DataError)
    g = _generator(seed)
    inputs = torch.empty(batch, length, dtype=torch.long)
    targets = torch.full_like(inputs, IGNORE)
    for b in range(batch):
        key = str(int(torch.randint(10 ** (digits - 1), 10**digits, (1,), generator=g)))
        note, question = PASSKEY_NOTE.format(key=key), PASSKEY_QUESTION.format(key=key)
        # inputs stop before the last digit: length + 1 bytes of text in all.
        filler_len = length + 1 - len(note) - len(question)
        filler = (FILLER * (filler_len // len(FILLER) + 1))[:filler_len]
        cut = round(depth * filler_len)
        cut = filler.rfind(". ", 0, cut) + 2 if 0 < cut < filler_len and ". " in filler[:cut] else cut
        text = (filler[:cut] + note + filler[cut:] + question).encode()
        ids = torch.tensor(list(text), dtype=torch.long)
        inputs[b] = ids[:-1]
        targets[b, length - digits :] = ids[-digits:]
    return inputs, targets


def addition_min_length(digits: int = 4) -> int:
    """The shortest addition example: ``a + b =`` and the sum without its last digit."""
    return 3 * digits + 2


def addition(batch: int, length: int, *, digits: int = 4, seed: int = 0):
    """``(inputs, targets)`` of multi-digit addition; see the module docstring."""
    _check_batch(batch, length)
    check(1 <= digits <= 18, f"addition digits must be in 1..18; got {digits}", DataError)
    shortest = addition_min_length(digits)
    check(length >= shortest, f"addition of {digits}-digit numbers needs length >= {shortest}; got {length}",
          DataError)
    g = _generator(seed)
    a, b = (torch.randint(0, 10**digits, (batch,), generator=g) for _ in range(2))
    place = 10 ** torch.arange(digits, -1, -1)  # most significant first, digits + 1 places

    def digits_of(x: torch.Tensor, n: int) -> torch.Tensor:
        return x[:, None] // place[-n:] % 10

    problem = torch.cat([digits_of(a, digits), torch.full((batch, 1), ADDITION_PLUS), digits_of(b, digits),
                         torch.full((batch, 1), ADDITION_EQUALS), digits_of(a + b, digits + 1)], 1)
    inputs = torch.full((batch, length), ADDITION_NOISE, dtype=torch.long)
    inputs[:, length - shortest :] = problem[:, :-1]  # inputs stop before the last digit
    targets = torch.full_like(inputs, IGNORE)
    targets[:, length - digits - 1 :] = problem[:, -digits - 1 :]
    return inputs, targets


TASKS = {"selective_copying": selective_copying, "induction": induction, "mqar": mqar, "passkey": passkey,
         "addition": addition}


def make_batch(task: str, batch: int, length: int, *, seed: int = 0, **options):
    """``(inputs, targets)`` of the task named ``task`` (one of ``TASKS``)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    try:
        return TASKS[task](batch, length, seed=seed, **options)
    except TypeError as e:
        raise DataError(f"bad options for task {task!r}: {e}") from None

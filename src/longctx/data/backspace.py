"""Injected mistakes followed by ``<backspace>`` in training data (SequenceMatch, Cundy &
Ermon 2023), so a model learns to take back a token that does not belong.

``inject_errors`` takes and returns a batch in the synthetic tasks' form
(``longctx.data.synthetic``): ``inputs``, ``targets`` int64 ``(batch, time)``, the loss
mask being ``targets != IGNORE``.  At an asked position ``t`` (one with a target ``y``, an
ordinary token ``< vocab``), with probability ``rate``, a wrong token ``w`` and a
backspace are inserted after ``t``.  The loss mask, explicitly:

    input   ... x_t   w     <backspace>   x_t+1 ...
    target  ... y     <bs>  y             ...

- ``t`` keeps its target ``y``: the wrong token is never a target (no loss on producing it);
- the wrong token's target is ``<backspace>`` (the loss that teaches the deletion);
- the backspace's target is ``y`` again, the sequence as if the mistake had not happened.

How ``w`` is drawn (never equal to ``y``; model-independent, so the data does not depend
on the model being trained):

- ``"uniform"``: uniform over ``0 .. vocab - 1`` except ``y``;
- ``"context"``: the input token at a uniformly random position ``0 .. t`` of the same
  row (the plausible mistake of copying and recall: a token from the context, often the
  right kind of token at the wrong place), or a ``"uniform"`` draw where that token is
  ``y`` or not an ordinary token.

Rows receive different numbers of mistakes: every row is padded at its end with
``pad_id`` inputs and ``IGNORE`` targets to the longest, ``time + 2 * most mistakes``
(padding after the last token changes no earlier output of a causal model).
"""

from __future__ import annotations

import torch

from longctx.validation import check

from .errors import DataError
from .synthetic import IGNORE

ERROR_RULES = ("uniform", "context")


def _uniform_except(correct: torch.Tensor, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Uniform over ``0 .. vocab - 1`` without ``correct`` (elementwise)."""
    r = torch.randint(0, vocab - 1, correct.shape, generator=g)
    return r + (r >= correct).long()


def inject_errors(inputs: torch.Tensor, targets: torch.Tensor, backspace_id: int, *, rate: float, vocab: int,
                  pad_id: int, errors: str = "uniform", seed: int = 0):
    """``(inputs, targets)`` with mistakes and backspaces, ``(batch, time + 2 * most
    mistakes in a row)``; see the module docstring for the rule and the loss mask."""
    check(targets.shape == inputs.shape, f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ",
          DataError)
    check(0.0 <= rate <= 1.0, f"the error rate must be in [0, 1]; got {rate}", DataError)
    check(isinstance(vocab, int) and vocab >= 2, f"errors need a vocab of >= 2 tokens; got {vocab!r}", DataError)
    check(errors in ERROR_RULES, f"unknown error rule {errors!r}; choose one of {', '.join(ERROR_RULES)}", DataError)
    batch, time = inputs.shape
    g = torch.Generator().manual_seed(seed)
    eligible = (targets >= 0) & (targets < vocab)  # IGNORE is negative
    mistake = (torch.rand(batch, time, generator=g) < rate) & eligible
    wrong = _uniform_except(targets.clamp(0, vocab - 1), vocab, g)
    if errors == "context":
        upto = torch.arange(1, time + 1)  # position t may copy any input at 0 .. t
        picked = inputs.gather(1, (torch.rand(batch, time, generator=g) * upto).long())
        usable = (picked != targets) & (picked >= 0) & (picked < vocab)
        wrong = torch.where(usable, picked, wrong)
    shift = 2 * mistake.long()
    pos = torch.arange(time) + shift.cumsum(1) - shift  # where each original position goes
    length = time + int(shift.sum(1).max())
    new_inputs = torch.full((batch, length), pad_id, dtype=inputs.dtype)
    new_targets = torch.full_like(new_inputs, IGNORE)
    new_inputs.scatter_(1, pos, inputs)
    new_targets.scatter_(1, pos, targets)
    rows, cols = mistake.nonzero(as_tuple=True)
    at = pos[rows, cols]
    new_inputs[rows, at + 1] = wrong[rows, cols]
    new_inputs[rows, at + 2] = backspace_id
    new_targets[rows, at + 1] = backspace_id
    new_targets[rows, at + 2] = targets[rows, cols]
    return new_inputs, new_targets

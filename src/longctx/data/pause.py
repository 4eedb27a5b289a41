"""Pause tokens in training data (Goyal et al. 2023, "Think before you speak").

Both transforms take and return a batch in the synthetic tasks' form
(``longctx.data.synthetic``): ``inputs`` and ``targets`` int64 ``(batch, time)``, where
``targets[b, t]`` is what the model must output at position ``t`` or ``IGNORE``.  The loss
mask is ``targets != IGNORE``, and it is explicit in what they return:

- a pause inserted after position ``t`` takes over ``t``'s target: the output after the
  last of the pauses there must be the token that followed ``t``, and ``t`` and the other
  pauses get ``IGNORE``, because their next token is a pause (the paper ignores the loss on
  predicting ``<pause>``);
- pauses never receive a target other than the real next token, so the outputs at pause
  positions count neither in the loss nor in an answer read from the asked positions.

``insert_pauses`` is the pretraining transform (pauses at uniformly random places; the
paper inserts 10% of the sequence length); ``pauses_after_prompt`` the fine-tuning one (M
pauses between the prompt and the first answer token).  For next-token data ``tokens
(batch, time + 1)`` the batch is ``(tokens[:, :-1], tokens[:, 1:])``.
"""

from __future__ import annotations

import torch

from longctx.validation import check

from .errors import DataError
from .synthetic import IGNORE


def insert_after(inputs: torch.Tensor, targets: torch.Tensor, after: torch.Tensor, token: int):
    """Insert ``token`` after the positions ``after (batch, n)`` (an index repeated k times
    inserts k tokens there) -> ``(inputs, targets)`` of ``(batch, time + n)``; each position
    with tokens after it hands its target to the last of them (module docstring)."""
    batch, time = inputs.shape
    check(targets.shape == inputs.shape, f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ",
          DataError)
    check(after.dim() == 2 and after.shape[0] == batch, f"after must be (batch, n); got {tuple(after.shape)}",
          DataError)
    check(after.numel() == 0 or (0 <= int(after.min()) and int(after.max()) < time),
          f"insertion positions must be in 0..{time - 1}", DataError)
    counts = torch.zeros(batch, time, dtype=torch.long).scatter_add_(1, after, torch.ones_like(after))
    pos = torch.arange(time) + counts.cumsum(1) - counts  # where each original position goes
    new_inputs = torch.full((batch, time + after.shape[1]), token, dtype=inputs.dtype)
    new_targets = torch.full_like(new_inputs, IGNORE)
    new_inputs.scatter_(1, pos, inputs)
    new_targets.scatter_(1, pos + counts, targets)  # to the last token inserted after it, or itself
    return new_inputs, new_targets


def insert_pauses(inputs: torch.Tensor, targets: torch.Tensor, pause_id: int, count: int, *, seed: int = 0):
    """Pretraining: ``count`` pauses per sequence at uniformly random places (positions drawn
    with replacement, so pauses may come in runs) -> ``(batch, time + count)``."""
    check(isinstance(count, int) and count >= 0, f"the number of pauses must be an integer >= 0; got {count!r}",
          DataError)
    g = torch.Generator().manual_seed(seed)
    after = torch.randint(0, inputs.shape[1], (inputs.shape[0], count), generator=g)
    return insert_after(inputs, targets, after, pause_id)


def pauses_after_prompt(inputs: torch.Tensor, targets: torch.Tensor, pause_id: int, count: int):
    """Fine-tuning: ``count`` pauses after the prompt, which ends at each row's first asked
    position (the input whose target is the first answer token) -> ``(batch, time + count)``;
    the first answer token becomes the target of the last pause."""
    check(isinstance(count, int) and count >= 0, f"the number of pauses must be an integer >= 0; got {count!r}",
          DataError)
    asked = targets != IGNORE
    check(bool(asked.any(1).all()), "every row needs an asked position (a target) to put pauses before", DataError)
    first = asked.long().argmax(1)
    return insert_after(inputs, targets, first[:, None].expand(-1, count), pause_id)

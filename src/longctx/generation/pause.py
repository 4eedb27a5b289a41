"""Decoding with pause tokens (Goyal et al. 2023): M ``<pause>`` tokens are appended after
the prompt, and the answer starts with the output at the last of them.

The outputs at the pauses are never read: the prompt and its pauses are prefilled in one
pass that returns the last position's logits only (``generate.prefill``).  A pause the
model generates while answering is fed back like any token (more computation, as in
pretraining with pauses) but is not part of the answer; it counts towards
``max_new_tokens``.  The pause id is the model's (``model.special_tokens``) unless given:
giving it lets a model trained without pauses decode with them, the paper's control.
"""

from __future__ import annotations

import torch

from longctx.generation.generate import _as_batch, stream


def append_pauses(ids, count: int, pause_id: int) -> torch.Tensor:
    """``ids (time,)`` or ``(batch, time)`` followed by ``count`` pauses: ``(batch, time + count)``."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"the number of pauses must be an integer >= 0; got {count!r}")
    ids = _as_batch(ids)
    return torch.cat([ids, ids.new_full((ids.shape[0], count), pause_id)], dim=1)


def generate_after_pauses(model, ids, pauses: int, max_new_tokens: int, *, pause_id: int | None = None,
                          **kwargs) -> list[list[int]]:
    """The answer to each prompt of ``ids`` (``(time,)`` or ``(batch, time)``) decoded after
    ``pauses`` pause tokens, pauses left out: one list of token ids per row.  ``kwargs``
    are ``stream``'s (sampling, ``stop``, ``state``, ...)."""
    if pause_id is None:
        pause_id = model.config.special_token("pause")
    if not 0 <= pause_id < model.config.vocab_size:
        raise ValueError(f"pause id {pause_id} is outside the model's vocabulary (0..{model.config.vocab_size - 1})")
    prompt = append_pauses(ids, pauses, pause_id)
    steps = list(stream(model, prompt, max_new_tokens, **kwargs))
    if not steps:
        return [[] for _ in range(prompt.shape[0])]
    return [[t for t in row if t != pause_id] for row in torch.stack(steps, 1).tolist()]

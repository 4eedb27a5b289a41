"""Decoding with ``<backspace>`` (SequenceMatch, Cundy & Ermon 2023): a generated backspace
deletes the last generated token, and the state goes back to before that token was fed.

The rule, step by step (one sequence):

- the backspace itself is never fed: every layer state undoes the deleted token's step
  (``ModelState.undo_step``: dense KV caches, sink and window caches, Mamba states; a
  recall cache refuses, before anything is decoded);
- the next token is drawn again from the logits that had produced the deleted one, with
  the deleted token excluded (greedy decoding would otherwise write it again forever);
- a backspace may delete generated tokens only, one at a time: right after the prompt and
  right after a backspace its probability is zero (the states keep one step of history,
  and training puts one backspace after each mistake, ``longctx.data.backspace``).

``stream_with_backspace`` yields every token drawn, backspaces included, so a caller can
show the deletions; ``generate_with_backspace`` returns the answer with them applied.
``max_new_tokens`` counts every token drawn, backspaces included.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from longctx.cache.model_state import ModelState
from longctx.generation.fast_decode import fast_decoder
from longctx.generation.generate import _as_batch, prefill
from longctx.generation.sampling import check_sampling, sample_next


def apply_backspaces(tokens: Iterable[int], backspace_id: int) -> list[int]:
    """``tokens`` with each backspace and the token before it removed."""
    out: list[int] = []
    for token in tokens:
        if token != backspace_id:
            out.append(token)
        elif out:
            out.pop()
    return out


@torch.no_grad()
def stream_with_backspace(model, ids, max_new_tokens: int, *, backspace_id: int | None = None,
                          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                          seed: int | None = None, stop: Iterable[int] = (),
                          state: ModelState | None = None) -> Iterator[int]:
    """Yield each token drawn after the prompt ``ids`` (``(time,)`` or ``(1, time)``),
    backspaces included; a ``stop`` token ends the stream.  ``state`` (default: a fresh
    dense one) lets a caller choose the cache (``model.init_state(1, cache="sinks", ...)``)
    and see where decoding left it: the prompt and the answer so far, less the answer's last
    token unless a backspace came last (as in ``stream``, no step is spent on a token that
    nobody may want); it keeps one step of history from then on (``ModelState.keep_undo``).
    ``backspace_id`` defaults to the model's (``model.special_tokens``)."""
    check_sampling(temperature, top_k, top_p)
    backspace = model.config.special_token("backspace") if backspace_id is None else backspace_id
    if not 0 <= backspace < model.config.vocab_size:
        raise ValueError(f"backspace id {backspace} is outside the model's vocabulary "
                         f"(0..{model.config.vocab_size - 1})")
    ids = _as_batch(ids).to(next(model.parameters()).device)
    if ids.shape[0] != 1:
        raise ValueError(f"backspace decoding runs one sequence at a time; got a batch of {ids.shape[0]}")
    state = model.init_state(1) if state is None else state
    limit = model.position_limit(state)
    if max_new_tokens < 0 or (limit is not None and state.seq_len + ids.shape[1] + max_new_tokens > limit):
        raise ValueError(f"max_new_tokens must be >= 0 and, with the prompt ({ids.shape[1]} tokens), within this "
                         f"model's limit of {limit} positions (model.max_seq_len); got {max_new_tokens}")
    state.keep_undo()  # before the prompt: a state that cannot undo is refused before any work
    generator = torch.Generator(device=ids.device)
    generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
    stop = set(stop)
    fast_step = fast_decoder(model, state) if ids.device.type == "cpu" else None
    logits = prefill(model, ids, state)
    before = last = None  # the last fed token, and the logits that drew it (drawn from again if it is deleted)
    banned = None  # the token just deleted, excluded from the next draw
    can_delete = False  # a fed answer token whose step the state can undo
    for step in range(max_new_tokens):
        masked = logits.clone()
        if not can_delete:
            masked[:, backspace] = float("-inf")
        if banned is not None:
            masked[:, banned] = float("-inf")
        token = int(sample_next(masked, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator))
        yield token
        if token == backspace:
            state.undo_step()
            logits, banned, can_delete = before, last, False
            continue
        if token in stop or step == max_new_tokens - 1:
            return
        feed = torch.tensor([[token]], device=ids.device)
        before, last, banned, can_delete = logits, token, None, True
        logits = model(feed, state, last_only=True)[:, -1] if fast_step is None else fast_step(feed)


@dataclass
class BackspaceResult:
    tokens: list[int]  # the answer, backspaces applied
    drawn: list[int]  # every token drawn, backspaces included
    backspaces: int  # how many tokens were deleted


def generate_with_backspace(model, ids, max_new_tokens: int, **kwargs) -> BackspaceResult:
    """``stream_with_backspace``'s tokens, with the backspaces applied; same arguments."""
    drawn = list(stream_with_backspace(model, ids, max_new_tokens, **kwargs))
    backspace = kwargs.get("backspace_id")
    backspace = model.config.special_token("backspace") if backspace is None else backspace
    return BackspaceResult(apply_backspaces(drawn, backspace), drawn, drawn.count(backspace))

"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import warnings

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if temperature == 0 and (top_k is not None or (top_p is not None and top_p < 1)):
        warnings.warn("top_k and top_p are ignored with temperature 0 (greedy)", stacklevel=3)


def next_token_probs(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
) -> torch.Tensor:
    """``logits (..., vocab) -> probabilities (..., vocab)`` that sampling draws from, after
    temperature, top-k and top-p (``temperature > 0``)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs = logits.softmax(dim=-1)
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        # The smallest set whose mass reaches top_p ends at the first index where the
        # cumulative mass does; every token at least that probable stays, so ties are
        # kept or dropped together (like top_k), whatever their order.
        cut = (sorted_probs.cumsum(dim=-1) < top_p).sum(dim=-1, keepdim=True).clamp_max(probs.shape[-1] - 1)
        threshold = sorted_probs.gather(-1, cut)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits.softmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits (batch, vocab) -> token ids (batch,)``.  ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

"""Loss, perplexity and bits per byte of a model over token windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    windows: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: np.ndarray,
    total: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, float]:
    """Mean next-token loss over ``(x, y)`` windows ``(batch, time)``.

    Returns ``loss`` (nats per token), ``ppl``, ``bpb`` (bits per UTF-8 byte of the
    predicted tokens: comparable across tokenizers) and ``tokens``.  ``total`` sums this
    process's (nats, tokens, bytes) with the other processes' when each holds a shard of
    the windows (sequence parallelism).
    """
    was_training = model.training
    model.eval()
    nats, tokens, n_bytes = 0.0, 0, 0
    table = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64))
    device = next(model.parameters()).device
    try:
        for x, y in windows:
            logits = model(x.to(device))
            nats += float(F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum"))
            tokens += y.numel()
            n_bytes += int(table[y].sum())
    finally:
        model.train(was_training)
    if total is not None:
        nats, tokens, n_bytes = total([nats, tokens, n_bytes])
    if tokens == 0:
        raise ValueError("no evaluation windows: the data is too short")
    loss = nats / tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nats / math.log(2) / max(n_bytes, 1),
        "tokens": tokens,
    }


def unigram_bits_per_byte(train_tokens: np.ndarray, eval_tokens: np.ndarray, token_bytes: np.ndarray, vocab_size: int) -> float:
    """Bits per byte of a unigram model (token frequencies of ``train_tokens``, add-one
    smoothed) on ``eval_tokens``: the baseline a trained model has to beat."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    ev = np.asarray(eval_tokens, dtype=np.int64)
    bits = -log_p[ev].sum()
    return float(bits / max(int(np.asarray(token_bytes)[ev].sum()), 1))

"""Loss, perplexity and bits per byte of a model over token windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from longctx.eval.plotting import pyplot, save_figure


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    windows: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: np.ndarray,
    total: Callable[[list[float]], list[float]] | None = None,
    by_position: bool = False,
) -> dict[str, Any]:
    """Mean next-token loss over ``(x, y)`` windows ``(batch, time)``.

    Returns ``loss`` (nats per token), ``ppl``, ``bpb`` (bits per UTF-8 byte of the
    predicted tokens: comparable across tokenizers) and ``tokens``.  ``total`` sums this
    process's (nats, tokens, bytes) with the other processes' when each holds a shard of
    the windows (sequence parallelism).

    ``by_position`` adds ``by_position``, an array ``(time,)`` of the mean loss at each
    position of the context: ``[t]`` is the loss of predicting ``y[:, t]`` after seeing
    ``x[:, : t + 1]``, so a curve that keeps falling means the model uses the longer
    context.  The windows must then share one length.
    """
    was_training = model.training
    model.eval()
    nats, tokens, n_bytes, windows_seen = 0.0, 0, 0, 0
    position_nats: torch.Tensor | None = None
    table = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64))
    device = next(model.parameters()).device
    try:
        for x, y in windows:
            logits = model(x.to(device))
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="none")
            nats += float(nll.double().sum())
            tokens += y.numel()
            n_bytes += int(table[y].sum())
            if by_position:
                per_position = nll.view(y.shape).double().sum(0).cpu()
                if position_nats is None:
                    position_nats = per_position
                elif position_nats.shape != per_position.shape:
                    raise ValueError("loss by position needs windows of one length; got "
                                     f"{position_nats.shape[0]} and {per_position.shape[0]} tokens")
                else:
                    position_nats += per_position
                windows_seen += y.shape[0]
    finally:
        model.train(was_training)
    if total is not None:
        nats, tokens, n_bytes = total([nats, tokens, n_bytes])
    if tokens == 0:
        raise ValueError("no evaluation windows: the data is too short")
    loss = nats / tokens
    result = {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nats / math.log(2) / max(n_bytes, 1),
        "tokens": tokens,
    }
    if by_position:
        result["by_position"] = (position_nats / windows_seen).numpy()
    return result


def unigram_bits_per_byte(train_tokens: np.ndarray, eval_tokens: np.ndarray, token_bytes: np.ndarray, vocab_size: int) -> float:
    """Bits per byte of a unigram model (token frequencies of ``train_tokens``, add-one
    smoothed) on ``eval_tokens``: the baseline a trained model has to beat."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    ev = np.asarray(eval_tokens, dtype=np.int64)
    bits = -log_p[ev].sum()
    return float(bits / max(int(np.asarray(token_bytes)[ev].sum()), 1))


def position_bins(losses: np.ndarray) -> list[tuple[int, int, float]]:
    """``(first, last, mean loss)`` over positions ``1, 2-3, 4-7, ...`` (1-based, doubling),
    the last bin ending at the final position: a short table of the loss by position."""
    losses = np.asarray(losses, dtype=np.float64)
    bins, first = [], 1
    while first <= len(losses):
        last = min(2 * first - 1, len(losses))
        bins.append((first, last, float(losses[first - 1 : last].mean())))
        first = last + 1
    return bins


def plot_loss_by_position(losses: np.ndarray | dict[str, np.ndarray], out_path, *,
                          title: str = "loss against position in the context"):
    """The loss by position (``evaluate_loss(..., by_position=True)``; one array, or
    ``{label: array}``) against position on a log x axis, as a PNG: each position faint, the
    means over ``position_bins`` as a line.  Needs matplotlib; without it, warn and return None."""
    plt = pyplot("loss-by-position plot")
    if plt is None:
        return None
    curves = losses if isinstance(losses, dict) else {"loss": losses}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        (line,) = ax.plot(np.arange(1, len(values) + 1), values, alpha=0.25, linewidth=0.8)
        bins = position_bins(values)
        centres = [np.sqrt(first * last) for first, last, _ in bins]  # geometric: the middle on a log axis
        ax.plot(centres, [mean for _, _, mean in bins], marker="o", color=line.get_color(), label=str(label))
    ax.set_xscale("log", base=2)
    ax.set(xlabel="position in the context (tokens)", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return save_figure(fig, out_path)

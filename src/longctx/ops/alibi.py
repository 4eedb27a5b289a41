"""ALiBi (Press et al., "Train Short, Test Long") slopes per head.

The bias itself, ``-slope_h * (i - j)``, is added inside ``attention`` block by block
(``attention(..., alibi_slopes=...)``), so no ``time x time`` matrix is ever built.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Geometric slopes ``2^(-8 i / n)`` for ``i = 1..n`` (paper §3), fp32 ``(n_heads,)``.

    For a head count that is not a power of two, the slopes of the next lower power of
    two are followed by every other slope of the next higher one (the paper's recipe).
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1; got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)

"""Rotary position embedding (RoPE) as a function, applied at arbitrary integer positions.

Pairing is "rotate half" (dimension ``i`` with ``i + head_dim/2``), as in Hugging Face
Llama, so imported checkpoints need no permutation.
"""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)`` for ``i < head_dim / 2``, fp32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim; got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope theta must be positive; got {theta}")
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    return (1.0 / theta**exponent).float()


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate ``x`` by its positions.

    Args:
        x: ``(batch, time, heads, head_dim)``.
        positions: integer ``(time,)`` or ``(batch, time)``: the position of each row.
        theta: base of the frequencies.

    Returns:
        Tensor like ``x``.  Angles are computed in fp64 from the integer positions, so
        positions in the millions rotate as precisely as small ones.
    """
    if x.dim() != 4:
        raise ValueError(f"rope expects (batch, time, heads, head_dim); got shape {tuple(x.shape)}")
    if positions.shape[-1] != x.shape[1]:
        raise ValueError(f"positions has {positions.shape[-1]} entries for {x.shape[1]} time steps")
    inv_freq = rope_frequencies(x.shape[-1], theta, device=x.device).double()
    angles = positions.to(x.device, torch.float64)[..., None] * inv_freq  # (..., time, D/2)
    if angles.dim() == 2:
        angles = angles[None]
    cos = torch.cos(angles).to(x.dtype)[:, :, None, :]  # (B|1, T, 1, D/2)
    sin = torch.sin(angles).to(x.dtype)[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

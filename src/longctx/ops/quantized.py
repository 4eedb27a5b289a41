"""Weight-only quantized linear maps: ``y = x W^T + b`` with W kept packed.

- int8: one fp32 scale per output channel, ``W[n, k] = q[n, k] * scale[n]``, q in -127..127.
- int4: groups of ``group`` consecutive inputs per output channel, asymmetric:
  ``W[n, k] = q[n, k] * scale[n, g] + low[n, g]`` with q in 0..15 and ``g = k // group``.
  Two codes share a byte: in each block of 32 inputs, byte ``j`` holds input ``32b + j`` in
  its low nibble and input ``32b + 16 + j`` in its high nibble.  The channels are stored in
  blocks of ``R`` (64, or the largest power of two dividing N): codes ``(N / R, K / 2, R)``,
  scales and lows ``(N / R, K / group, R)``, so that byte column ``j`` of a block, one byte
  per channel, is contiguous: the vector lanes of the kernel (``quantized_kernels``).

Decoding multiplies one or a few rows by the weight, which is memory-bound: the CPU
kernels read the packed codes (1/4 or 1/8 of fp32's bytes) and convert them in registers
(numba, vectorised by LLVM, parallel over output channels).  Longer inputs (prefill), and
inputs that need gradients, dequantize the weight (a numba kernel on the CPU: under a
millisecond per million weights) and call ``F.linear``: the dequantized copy lives for one call only,
so memory stays that of the packed weights.  Other devices run ``*_linear_ref``, the plain
reference of each: dequantization in torch ops, then ``F.linear``.

Shapes: x ``(..., K)``, W ``(N, K)``, y ``(..., N)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Up to this many rows of x the packed kernel runs; beyond, dequantize + matmul wins.
KERNEL_MAX_ROWS = 8
INT4_GROUPS = (32, 64, 128)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (N, K)`` -> codes int8 ``(N, K)`` and scales fp32 ``(N,)`` (symmetric, per row)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int4_lanes(n: int) -> int:
    """Channels per block of the int4 layout: 64, or the largest power of two dividing ``n``."""
    return next(r for r in (64, 32, 16, 8, 4, 2, 1) if n % r == 0)


def quantize_int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w (N, K)`` -> packed codes uint8 ``(N / R, K / 2, R)``, scales and lows fp32
    ``(N / R, K / group, R)`` (module docstring)."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUPS))}; got {group}")
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size ({group})")
    g = w.detach().float().reshape(n, k // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(n, k // 32, 32)
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
    return _to_blocks(packed), _to_blocks(scale), _to_blocks(low)


def _to_blocks(t: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` -> ``(N / R, C, R)``: each block of R channels with the channel last."""
    n, c = t.shape
    r = int4_lanes(n)
    return t.reshape(n // r, r, c).transpose(1, 2).contiguous()


def _from_blocks(t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_to_blocks``: ``(N / R, C, R)`` -> ``(N, C)``."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    scale, low = _from_blocks(scale), _from_blocks(low)
    n, groups = scale.shape
    p = _from_blocks(packed).reshape(n, -1, 16)
    q = torch.cat([p & 15, p >> 4], dim=-1).reshape(n, groups, -1).float()
    return (q * scale[..., None] + low[..., None]).reshape(n, -1)


def int8_linear_ref(x, q, scale, bias=None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(q, scale).to(x.dtype), bias)


def int4_linear_ref(x, packed, scale, low, bias=None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(packed, scale, low).to(x.dtype), bias)


def _use_matvec(x: torch.Tensor) -> bool:
    """Whether the packed kernel multiplies ``x``: fp32 on the CPU, 1 to ``KERNEL_MAX_ROWS``
    rows, no gradient wanted."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    return x.dtype == torch.float32 and 0 < rows <= KERNEL_MAX_ROWS and not wants_grad


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """``x (..., K)`` times the int8 weight ``(q, scale)``, plus ``bias``: ``(..., N)``."""
    if x.device.type != "cpu":
        return int8_linear_ref(x, q, scale, bias)
    from longctx.ops import quantized_kernels as kernels

    if not _use_matvec(x):
        w = torch.empty(q.shape, dtype=torch.float32)
        kernels.int8_dequantize(q.numpy(), scale.numpy(), w.numpy())
        return F.linear(x, w.to(x.dtype), bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], q.shape[0], dtype=torch.float32)
    kernels.int8_matvec(rows.numpy(), q.numpy(), scale.numpy(), out.numpy())
    out = out.reshape(*x.shape[:-1], q.shape[0])
    return out if bias is None else out + bias


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                bias: torch.Tensor | None = None):
    """``x (..., K)`` times the int4 weight ``(packed, scale, low)``, plus ``bias``: ``(..., N)``."""
    if x.device.type != "cpu":
        return int4_linear_ref(x, packed, scale, low, bias)
    from longctx.ops import quantized_kernels as kernels

    n = packed.shape[0] * packed.shape[2]
    if not _use_matvec(x):
        w = torch.empty(n, 2 * packed.shape[1], dtype=torch.float32)
        kernels.int4_dequantize(packed.numpy(), scale.numpy(), low.numpy(), w.numpy())
        return F.linear(x, w.to(x.dtype), bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    kernels.int4_matvec(rows.numpy(), packed.numpy(), scale.numpy(), low.numpy(), out.numpy())
    out = out.reshape(*x.shape[:-1], n)
    return out if bias is None else out + bias

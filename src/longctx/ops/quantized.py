"""Weight-only quantized linear maps: ``y = x W^T + b`` with W kept packed.

- int8: one fp32 scale per output channel, ``W[n, k] = q[n, k] * scale[n]``, q in -127..127.
- int4: groups of ``group`` consecutive inputs per output channel, asymmetric:
  ``W[n, k] = q[n, k] * scale[n, g] + low[n, g]`` with q in 0..15 and ``g = k // group``.
  Two codes share a byte: in group g, byte ``j`` holds input ``g*group + j`` in its low
  nibble and input ``g*group + group/2 + j`` in its high nibble, so that a kernel reads
  both halves of the group's inputs contiguously.

Decoding multiplies one or a few rows by the weight, which is memory-bound: the CPU
kernels read the packed codes (1/4 or 1/8 of fp32's bytes) and convert them in registers
(numba, vectorised by LLVM, parallel over output channels).  Longer inputs (prefill) and
other devices dequantize the weight and call ``F.linear``; so does anything that needs
gradients with respect to ``x``.  ``*_linear_ref`` is the plain reference of each.

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


def quantize_int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w (N, K)`` -> packed codes uint8 ``(N, K / 2)``, scales and lows fp32 ``(N, K / group)``."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUPS))}; got {group}")
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size ({group})")
    g = w.detach().float().reshape(n, k // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(n, k // 2).contiguous(), scale.contiguous(), low.contiguous()


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    n, groups = scale.shape
    p = packed.reshape(n, groups, -1)
    q = torch.cat([p & 15, p >> 4], dim=-1).float()
    return (q * scale[..., None] + low[..., None]).reshape(n, -1)


def int8_linear_ref(x, q, scale, bias=None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(q, scale).to(x.dtype), bias)


def int4_linear_ref(x, packed, scale, low, bias=None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(packed, scale, low).to(x.dtype), bias)


def _use_kernel(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    return x.device.type == "cpu" and x.dtype == torch.float32 and 0 < rows <= KERNEL_MAX_ROWS and not wants_grad


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """``x (..., K)`` times the int8 weight ``(q, scale)``, plus ``bias``: ``(..., N)``."""
    if not _use_kernel(x):
        return int8_linear_ref(x, q, scale, bias)
    from longctx.ops.quantized_kernels import int8_matvec

    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], q.shape[0], dtype=torch.float32)
    int8_matvec(rows.numpy(), q.numpy(), scale.numpy(), out.numpy())
    out = out.reshape(*x.shape[:-1], q.shape[0])
    return out if bias is None else out + bias


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                bias: torch.Tensor | None = None):
    """``x (..., K)`` times the int4 weight ``(packed, scale, low)``, plus ``bias``: ``(..., N)``."""
    if not _use_kernel(x):
        return int4_linear_ref(x, packed, scale, low, bias)
    from longctx.ops.quantized_kernels import int4_matvec

    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], packed.shape[0], dtype=torch.float32)
    int4_matvec(rows.numpy(), packed.numpy(), scale.numpy(), low.numpy(), out.numpy())
    out = out.reshape(*x.shape[:-1], packed.shape[0])
    return out if bias is None else out + bias

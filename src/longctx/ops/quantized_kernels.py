"""numba kernels of ``longctx.ops.quantized``: a few rows of x times a packed weight.

Each output channel's codes are read once for all rows, converted to fp32 in registers
and accumulated; channels are split over the threads (``prange``).  fastmath lets LLVM
reorder the sums of a dot product into vector lanes (the result differs from the
sequential sum by rounding only).
"""

from __future__ import annotations

import numba
import numpy as np

from longctx.ops.numba_math import jit

_FAST = dict(parallel=True, fastmath=True, error_model="numpy")


@jit(**_FAST)
def int8_matvec(x, q, scale, out):
    """``out (M, N) = x (M, K) @ (q (N, K) int8 * scale (N,))^T``."""
    m_rows, k_size = x.shape
    for n in numba.prange(q.shape[0]):
        for m in range(m_rows):
            acc = np.float32(0.0)
            for k in range(k_size):
                acc += x[m, k] * np.float32(q[n, k])
            out[m, n] = acc * scale[n]


@jit(**_FAST)
def int4_matvec(x, packed, scale, low, out):
    """``out (M, N) = x (M, K) @ W^T`` with W the int4 weight of ``longctx.ops.quantized``:
    per group, ``sum_k x_k (q_k s + l) = s sum_k x_k q_k + l sum_k x_k``."""
    m_rows, k_size = x.shape
    groups = scale.shape[1]
    group = k_size // groups
    half = group // 2
    sums = np.empty((m_rows, groups), dtype=np.float32)  # sum of each group's inputs, per row
    for m in range(m_rows):
        for g in range(groups):
            s = np.float32(0.0)
            for k in range(g * group, (g + 1) * group):
                s += x[m, k]
            sums[m, g] = s
    for n in numba.prange(packed.shape[0]):
        for m in range(m_rows):
            total = np.float32(0.0)
            for g in range(groups):
                base, byte = g * group, g * half
                acc = np.float32(0.0)
                for j in range(half):
                    b = packed[n, byte + j]
                    acc += x[m, base + j] * np.float32(b & 15) + x[m, base + half + j] * np.float32(b >> 4)
                total += acc * scale[n, g] + low[n, g] * sums[m, g]
            out[m, n] = total

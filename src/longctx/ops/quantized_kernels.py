"""numba kernels of ``longctx.ops.quantized``: a few rows of x times a packed weight.

Decoding reads every weight once per token, so these kernels are written for the
memory system: the codes are read once for all rows of x, converted to fp32 in vector
registers and accumulated there; the threads split the output channels (``prange``).
fastmath lets LLVM reorder the sums into vector lanes (the result differs from the
sequential sum by rounding only); ``wide_vectors`` gives 16 fp32 lanes on AVX-512.

- int8 (codes ``(N, K)``): one dot product per channel and row of x, over K contiguous
  codes; LLVM turns the loop into sign-extending loads, conversions and fused
  multiply-adds over four 16-lane accumulators (``inspect_asm``: ``vpmovsxbd``,
  ``vcvtdq2ps``, ``vfmadd231ps``).
- int4 (codes ``(N / R, K / 2, R)``, see ``longctx.ops.quantized``): a group of 32 inputs
  is too short a loop for the vectoriser, so the lanes run over the ``R`` channels of a
  block instead: byte column ``j`` of a block holds one code pair of each of its R
  channels, and the innermost loop ``acc[r] += x_lo * lo(byte[r]) + x_hi * hi(byte[r])``
  is one long vector loop (``vpand``, a shift, ``vpmovzxbd``, ``vcvtdq2ps``, two fmas per
  16 channels).  After each group, ``acc * scale + low * sum(x over the group)`` moves into
  the total.
"""

from __future__ import annotations

import numba
import numpy as np

from longctx.ops.numba_math import jit, no_overlap, wide_vectors

_FAST = dict(fastmath=True, error_model="numpy", boundscheck=False)
_F32, _U8 = np.float32, np.uint8
# Parallel items of the int4 matvec: enough for 16 threads, few enough that each one's
# scratch is allocated once for many blocks.  (numba.get_num_threads() inside a kernel
# would keep numba from caching it and every kernel that calls it.)
ITEMS = 16


@jit(parallel=True, **_FAST)
def int8_matvec(x, q, scale, out):
    """``out (M, N) = x (M, K) @ (q (N, K) int8 * scale (N,))^T``."""
    wide_vectors()
    m_rows, k_size = x.shape
    for n in numba.prange(q.shape[0]):
        for m in range(m_rows):
            acc = _F32(0.0)
            for k in range(k_size):
                acc += x[m, k] * _F32(q[n, k])
            out[m, n] = acc * scale[n]


@jit(**_FAST)
def _int4_block(x, group_sums, packed, scale, low, out, acc, total, block):
    """The ``R`` channels of ``block``: ``out[:, block * R : (block + 1) * R]``.  ``acc`` and
    ``total`` are scratch ``(R,)``; x ``(M, K)``, group_sums ``(M, groups)``."""
    wide_vectors()
    no_overlap()
    m_rows = x.shape[0]
    lanes = packed.shape[2]
    groups = scale.shape[1]
    group_bytes = packed.shape[1] // groups
    for m in range(m_rows):
        for r in range(lanes):
            total[r] = 0.0
        for g in range(groups):
            for r in range(lanes):
                acc[r] = 0.0
            for j in range(g * group_bytes, (g + 1) * group_bytes):
                k = (j >> 4) * 32 + (j & 15)  # byte j of a row: inputs k (low nibble) and k + 16 (high)
                x_lo, x_hi = x[m, k], x[m, k + 16]
                for r in range(lanes):
                    b = packed[block, j, r]
                    acc[r] += x_lo * _F32(_U8(b & _U8(15))) + x_hi * _F32(_U8(b >> _U8(4)))
            s = group_sums[m, g]
            for r in range(lanes):
                total[r] += acc[r] * scale[block, g, r] + low[block, g, r] * s
        for r in range(lanes):
            out[m, block * lanes + r] = total[r]


@jit(parallel=True, **_FAST)
def int4_matvec(x, packed, scale, low, out):
    """``out (M, N) = x (M, K) @ W^T`` with W the int4 weight ``(packed, scale, low)`` of
    ``longctx.ops.quantized``: per group, ``sum_k x_k (q_k s + l) = s sum_k x_k q_k + l sum_k x_k``.
    ``ITEMS`` parallel items, each a contiguous run of channel blocks with its own scratch."""
    m_rows, k_size = x.shape
    groups = scale.shape[1]
    group = k_size // groups
    group_sums = np.empty((m_rows, groups), dtype=_F32)
    for m in range(m_rows):
        for g in range(groups):
            s = _F32(0.0)
            for k in range(g * group, (g + 1) * group):
                s += x[m, k]
            group_sums[m, g] = s
    blocks = packed.shape[0]
    items = min(ITEMS, blocks)
    for t in numba.prange(items):
        acc = np.empty(packed.shape[2], dtype=_F32)
        total = np.empty(packed.shape[2], dtype=_F32)
        for block in range(t * blocks // items, (t + 1) * blocks // items):
            _int4_block(x, group_sums, packed, scale, low, out, acc, total, block)


@jit(parallel=True, **_FAST)
def int8_dequantize(q, scale, out):
    """``out (N, K) = q (N, K) * scale (N,)[:, None]`` in fp32."""
    wide_vectors()
    for n in numba.prange(q.shape[0]):
        s = scale[n]
        for k in range(q.shape[1]):
            out[n, k] = _F32(q[n, k]) * s


@jit(parallel=True, **_FAST)
def int4_dequantize(packed, scale, low, out):
    """``out (N, K)``: the fp32 weight of the int4 ``(packed, scale, low)``, row by row."""
    lanes = packed.shape[2]
    groups = scale.shape[1]
    group_bytes = packed.shape[1] // groups
    for block in numba.prange(packed.shape[0]):
        for r in range(lanes):
            n = block * lanes + r
            for g in range(groups):
                s, lo = scale[block, g, r], low[block, g, r]
                for j in range(g * group_bytes, (g + 1) * group_bytes):
                    b = packed[block, j, r]
                    k = (j >> 4) * 32 + (j & 15)
                    out[n, k] = _F32(_U8(b & _U8(15))) * s + lo
                    out[n, k + 16] = _F32(_U8(b >> _U8(4))) * s + lo

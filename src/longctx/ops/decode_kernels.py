"""numba kernels of a one-token decoding step through an attention + SwiGLU block, on the CPU.

A decoding step through the modules costs ~50 small torch ops per layer, and on a small
model their dispatch costs more than the arithmetic.  These kernels do a layer's work in
two calls:

- ``attention_in``: RMSNorm, the QKV projection, RoPE on q and k;
- ``attention_out_mlp``: attention of the step's queries to the KV cache, the output
  projection and residual, RMSNorm, the SwiGLU MLP and residual.

Between them the caller appends k and v to the cache (``longctx.cache.KVCache``); the
caller is ``longctx.generation.fast_decode``.  The plain reference is the modules' own
forward (``longctx.layers``), which the tests compare with.

Vectors are one token's: x ``(d_model,)``, qkv ``((heads + 2 kv_heads) head_dim,)``.  A
weight is a tuple of arrays, one tuple length per format: fp32 ``(w,)`` ``(N, K)``; int8
``(codes, scale)`` and int4 ``(codes, scale, low)`` in ``longctx.ops.quantized``'s layouts;
``linear`` picks the matvec kernel by the length at compile time.  A missing bias is an
empty array.  The matvecs and the attention run on numba's threads (their own ``prange``
loops); the rest is elementwise work on a few thousand numbers, done inline.  Exponentials
are ``numba_math.exp``'s, which vectorise (libm's do not: no SVML).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import overload

from longctx.ops.numba_math import exp, jit, silu, wide_vectors
from longctx.ops.quantized_kernels import int4_matvec, int8_matvec

_FAST = dict(fastmath=True, error_model="numpy", boundscheck=False)
_F32 = np.float32


@jit(parallel=True, **_FAST)
def fp32_matvec(x, w, out):
    """``out (M, N) = x (M, K) @ w (N, K)^T``."""
    wide_vectors()
    m_rows, k_size = x.shape
    for n in numba.prange(w.shape[0]):
        for m in range(m_rows):
            acc = _F32(0.0)
            for k in range(k_size):
                acc += x[m, k] * w[n, k]
            out[m, n] = acc


def linear(w, bias, x, out):
    """``out (N,) = W x + bias`` for ``x (K,)`` and a weight tuple ``w`` (module docstring)."""


@jit(**_FAST)
def add_bias(bias, out):
    """``out += bias`` (a missing bias is an empty array)."""
    for n in range(bias.shape[0]):
        out[n] += bias[n]


@overload(linear)
def _linear(w, bias, x, out):
    formats = len(w.types)

    if formats == 1:
        def impl(w, bias, x, out):
            fp32_matvec(x.reshape((1, x.shape[0])), w[0], out.reshape((1, out.shape[0])))
            add_bias(bias, out)
    elif formats == 2:
        def impl(w, bias, x, out):
            int8_matvec(x.reshape((1, x.shape[0])), w[0], w[1], out.reshape((1, out.shape[0])))
            add_bias(bias, out)
    else:
        def impl(w, bias, x, out):
            int4_matvec(x.reshape((1, x.shape[0])), w[0], w[1], w[2], out.reshape((1, out.shape[0])))
            add_bias(bias, out)
    return impl


@jit(**_FAST)
def _rms_norm(x, weight, eps, out):
    """``out = x / sqrt(mean(x^2) + eps) * weight``."""
    wide_vectors()
    total = _F32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    r = _F32(1.0) / np.sqrt(total / _F32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        out[i] = x[i] * r * weight[i]


@jit(**_FAST)
def _rope(qk, heads, cos_sin):
    """Rotate the first ``heads`` heads of ``qk`` in place by ``cos_sin (2, head_dim)``
    (``longctx.ops.rope``'s row: ``[cos, cos]`` and ``[-sin, sin]``): rotate-half pairing."""
    dim = cos_sin.shape[1]
    half = dim // 2
    for h in range(heads):
        base = h * dim
        for i in range(half):
            a, b = qk[base + i], qk[base + half + i]
            qk[base + i] = a * cos_sin[0, i] + b * cos_sin[1, i]
            qk[base + half + i] = b * cos_sin[0, half + i] + a * cos_sin[1, half + i]


@jit(**_FAST)
def attention_in(x, norm_w, eps, qkv_w, qkv_b, cos_sin, rotated, qkv):
    """``qkv = W_qkv rms_norm(x) + b``, its first ``rotated`` heads (q and k; 0: no RoPE)
    rotated by ``cos_sin``.  x ``(d_model,)``, qkv ``((heads + 2 kv_heads) head_dim,)``."""
    h = np.empty_like(x)
    _rms_norm(x, norm_w, eps, h)
    linear(qkv_w, qkv_b, h, qkv)
    if rotated:
        _rope(qkv, rotated, cos_sin)


@jit(**_FAST)
def _softmax_in_place(scores, count):
    """``scores[:count] <- exp(scores - max)``; returns (max, sum)."""
    top = -np.inf
    for j in range(count):
        top = max(top, scores[j])
    total = _F32(0.0)
    for j in range(count):
        p = exp(scores[j] - top)
        scores[j] = p
        total += p
    return top, total


@jit(**_FAST)
def _attend_piece(q, keys, values, s0, s1, scale, top, total, acc):
    """The ``group`` query heads ``q (group, dim)`` of one kv head over its positions
    ``s0 .. s1 - 1`` of ``keys``/``values (capacity, dim)``: each head's max score, sum of
    exponentials and weighted values into ``top``, ``total (group,)`` and ``acc (group,
    dim)``.  Loops run over contiguous rows, which LLVM vectorises."""
    wide_vectors()
    group, dim = q.shape
    scores = np.empty((group, s1 - s0), dtype=_F32)
    qs = q * scale
    for s in range(s0, s1):
        key = keys[s]
        for g in range(group):
            dot = _F32(0.0)
            row = qs[g]
            for d in range(dim):
                dot += row[d] * key[d]
            scores[g, s - s0] = dot
    out = np.zeros((group, dim), dtype=_F32)
    for g in range(group):
        top[g], total[g] = _softmax_in_place(scores[g], s1 - s0)
    for s in range(s0, s1):
        value = values[s]
        for g in range(group):
            p = scores[g, s - s0]
            row = out[g]
            for d in range(dim):
                row[d] += p * value[d]
    acc[:] = out


@jit(parallel=True, **_FAST)
def _attend(q, k_cache, v_cache, lo, hi, heads, scale, out, chunks):
    """One query per head attending to cached positions ``lo .. hi - 1``.

    q, out ``(heads * head_dim,)``; k_cache, v_cache ``(kv_heads, capacity, head_dim)``,
    head-major (a ``KVCache``'s storage of batch row 0).  Query head ``h`` reads kv head
    ``h // (heads / kv_heads)``.  The keys of each kv head are split into ``chunks``
    pieces, one per parallel item; each piece keeps its own max, sum and weighted values
    (``part_*``), merged exactly at the end (flash-decoding's split-K)."""
    wide_vectors()
    kv_heads, _, dim = k_cache.shape
    group = heads // kv_heads
    n = hi - lo
    part_m = np.empty((heads, chunks), dtype=_F32)
    part_l = np.empty((heads, chunks), dtype=_F32)
    part_acc = np.zeros((heads, chunks, dim), dtype=_F32)
    for item in numba.prange(kv_heads * chunks):
        hk, c = item // chunks, item % chunks
        s0, s1 = lo + c * n // chunks, lo + (c + 1) * n // chunks
        _attend_piece(q[hk * group * dim : (hk + 1) * group * dim].reshape((group, dim)), k_cache[hk], v_cache[hk],
                      s0, s1, scale, part_m[hk * group : (hk + 1) * group, c],
                      part_l[hk * group : (hk + 1) * group, c], part_acc[hk * group : (hk + 1) * group, c])
    for h in range(heads):
        top = -np.inf
        for c in range(chunks):
            top = max(top, part_m[h, c])
        weights = np.empty(chunks, dtype=_F32)
        total = _F32(0.0)
        for c in range(chunks):
            weights[c] = np.exp(part_m[h, c] - top) if part_l[h, c] > 0 else _F32(0.0)
            total += weights[c] * part_l[h, c]
        for d in range(dim):
            acc = _F32(0.0)
            for c in range(chunks):
                acc += weights[c] * part_acc[h, c, d]
            out[h * dim + d] = acc / total


# One query per head over a KV cache's storage, as a kernel of its own: the per-sequence
# attention of batched decoding (longctx.generation.batched).
attend = _attend


@jit(**_FAST)
def attention_out_mlp(x, qkv, k_cache, v_cache, lo, hi, heads, scale, out_w, out_b, norm_w, eps,
                      gate_up_w, down_w, hidden, chunks):
    """The rest of the block after the cache took this step's k and v: returns
    ``y + W_down (silu(gate) * up)`` with ``y = x + W_out attention(q, cache) + b_out`` and
    ``gate, up = W_gate_up rms_norm(y)`` (``hidden`` each).  q is the start of ``qkv``; the
    cache holds positions ``lo .. hi - 1`` (this step's last)."""
    dim = k_cache.shape[2]
    attended = np.empty(heads * dim, dtype=_F32)
    _attend(qkv[: heads * dim], k_cache, v_cache, lo, hi, heads, scale, attended, chunks)
    y = np.empty_like(x)
    linear(out_w, out_b, attended, y)
    for i in range(x.shape[0]):
        y[i] += x[i]
    h = np.empty_like(x)
    _rms_norm(y, norm_w, eps, h)
    gate_up = np.empty(2 * hidden, dtype=_F32)
    linear(gate_up_w, np.empty(0, dtype=_F32), h, gate_up)
    act = _swiglu(gate_up, hidden)
    mlp = np.empty_like(x)
    linear(down_w, np.empty(0, dtype=_F32), act, mlp)
    for i in range(x.shape[0]):
        y[i] += mlp[i]
    return y


@jit(**_FAST)
def _swiglu(gate_up, hidden):
    """``silu(gate) * up`` of ``gate_up = [gate, up]``, ``(hidden,)``."""
    out = np.empty(hidden, dtype=_F32)
    for i in range(hidden):
        g = gate_up[i]
        out[i] = silu(g) * gate_up[hidden + i]
    return out

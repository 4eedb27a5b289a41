"""Exact softmax attention that returns its log-sum-exp, and the merge of partial attentions.

Layout throughout: ``(batch, time, heads, head_dim)``.

``attention`` runs on PyTorch's flash-style kernel (online softmax, never a full
``time x kv_time`` score matrix), except for a few queries (a decoding step), where two
matmuls and a softmax over the ``time x kv_time`` scores are cheaper; ``attention_ref`` is
the dense masked softmax both are tested against.  Both return ``(out, lse)`` where ``lse`` is the natural-log softmax
denominator of each query row, so partial attentions over disjoint key sets combine
exactly with ``merge``.

Causal alignment: queries are the *last* ``time`` positions of the ``kv_time`` keys
(bottom-right), which is what decoding with a KV cache needs.  Query ``i`` sees keys
``j <= i + kv_time - time``.  With a sliding ``window`` (Mistral), query ``i`` at position
``p = i + kv_time - time`` sees keys ``p - window < j <= p``: itself and the ``window - 1``
keys before it, as transformers' sliding-window mask.
"""

from __future__ import annotations

import torch

from longctx.validation import positive_int

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Query rows per step of the blocked path (ALiBi, non-CPU devices); its bias is heads x this x kv_time.
_BLOCK = 256
# Up to this many queries, ``_attention_few_queries``: the flash kernel's per-call set-up
# costs more than the whole step (3x at one query and 512 keys).
FEW_QUERIES = 8


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention expects q, k, v of shape (batch, time, heads, head_dim); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _causal_mask(time: int, kv_time: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Boolean ``(time, kv_time)`` mask of allowed pairs, bottom-right aligned (and within
    ``window`` positions of the query, when given)."""
    i = torch.arange(time, device=device)[:, None] + (kv_time - time)
    j = torch.arange(kv_time, device=device)[None, :]
    return (j <= i) if window is None else (j <= i) & (j > i - window)


def _check_window(window, causal: bool) -> None:
    if window is None:
        return
    positive_int("window", window, allow_none=True)
    if not causal:
        raise ValueError("a sliding window needs causal=True (it keeps the window - 1 keys before each query)")


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """ALiBi additive bias ``-slope_h * |q_pos - k_pos|``, fp32 ``(heads, time, kv_time)``.

    Causal attention only sees ``k_pos <= q_pos``, where this is the paper's
    ``-slope * (i - j)``; the absolute value makes the non-causal case penalise distance
    in both directions instead of rewarding far-future keys.
    """
    dist = (q_pos[:, None] - k_pos[None, :]).abs().float()
    return -slopes.float()[:, None, None] * dist


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked-softmax attention: the plain reference for ``attention``.

    q ``(B, T, H, D)``, k/v ``(B, S, Hkv, D)`` -> out ``(B, T, H, D)``, lse ``(B, T, H)``.
    Materialises the ``(B, H, T, S)`` score matrix; for tests and small inputs only.
    """
    check_qkv(q, k, v)
    _check_window(window, causal)
    time, kv_time = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2), v.repeat_interleave(group, 2).transpose(1, 2)
    bias = None
    if alibi_slopes is not None:
        q_pos = torch.arange(kv_time - time, kv_time, device=q.device)
        bias = alibi_bias(alibi_slopes, q_pos, torch.arange(kv_time, device=q.device))
    out, lse = _dense(qt, kt, vt, causal, scale, bias, window)
    return out.transpose(1, 2), lse.transpose(1, 2)


def _dense(q, k, v, causal: bool, scale: float, bias=None, window: int | None = None):
    """Dense masked softmax on ``(B, H, T, D)`` with an optional additive ``bias``; computes in
    fp32 at least (fp64 stays fp64).  The reference, and the kernel of devices without the
    CPU flash op (called there on blocks of queries)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bhtd,bhsd->bhts", q.to(dtype), k.to(dtype)) * scale
    if bias is not None:
        s = s + bias.to(dtype)
    if causal:
        s = s.masked_fill(~_causal_mask(q.shape[2], k.shape[2], q.device, window), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # Rows with no allowed key: lse = -inf, output 0 (not nan).
    p = torch.exp(s - lse.clamp_min(torch.finfo(dtype).min)[..., None])
    return torch.einsum("bhts,bhsd->bhtd", p, v.to(dtype)).to(q.dtype), lse


class _FlashAttention(torch.autograd.Function):
    """The CPU flash kernel with a backward that also accepts a gradient for ``lse``.

    Inputs are ``(B, H, T, D)``.  The kernel has no key-length offset, so only two
    alignments are used: no mask, or causal with ``T == S`` (where top-left and
    bottom-right coincide).  ``mask`` is an optional additive float bias ``(B|1, H|1, T, S)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, mask):
        out, lse = _flash_fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        if d_lse is None or not bool(d_lse.any()):
            # d_out arrives with the kernel output's strides; a .contiguous() copy here
            # would cost two extra (B, T, H, D) tensors for nothing.
            dq, dk, dv = _flash_bwd(d_out, q, k, v, out, lse, 0.0, ctx.causal, attn_mask=mask, scale=ctx.scale)
            return dq, dk, dv, None, None, None
        # d lse_i / d s_ij = p_ij, so the score gradient becomes p * (dp - delta + d_lse).
        # The kernel computes dp = d_out . v and delta = d_out . out; appending a column of
        # ones to v, d_lse to d_out and zero to out adds exactly d_lse to dp and nothing to
        # delta.  q and k get a zero column so the scores are unchanged.
        def pad(x, value):
            return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], dim=-1)

        d_out1 = torch.cat([d_out, d_lse.unsqueeze(-1).to(d_out.dtype)], dim=-1)
        dq, dk, dv = _flash_bwd(
            d_out1, pad(q, 0.0), pad(k, 0.0), pad(v, 1.0), pad(out, 0.0), lse, 0.0, ctx.causal,
            attn_mask=mask, scale=ctx.scale,
        )
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None, None


def _has_flash(device: torch.device) -> bool:
    """Whether the fused kernel with a log-sum-exp output runs on ``device``."""
    return device.type == "cpu"


def _kernel(q, k, v, causal: bool, scale: float, mask=None):
    """One fused attention call, ``(B, H, T, D)`` in and out; lse ``(B, H, T)`` in fp32."""
    if _has_flash(q.device):
        return _FlashAttention.apply(q, k, v, causal, scale, mask)
    return _dense(q, k, v, causal, scale, mask)


def _attention_causal_offset(q, k, v, scale: float):
    """Bottom-right causal attention with ``S > T`` keys via two kernel calls, O(T) memory.

    The first ``S - T`` keys are visible to every query; the last ``T`` keys form a
    square causal block.  Attend to each part and merge exactly.
    """
    split = k.shape[2] - q.shape[2]
    out_a, lse_a = _kernel(q, k[:, :, :split], v[:, :, :split], False, scale)
    out_b, lse_b = _kernel(q, k[:, :, split:], v[:, :, split:], True, scale)
    return merge(out_a, lse_a, out_b, lse_b)


def _attention_few_queries(q, k, v, causal: bool, scale: float, with_lse: bool):
    """Attention of a few queries, by matmuls: q ``(B, T, H, D)``, k/v ``(B, S, Hkv, D)`` in
    any strides, ``(B, H, T, D)`` out and lse ``(B, H, T)`` (None unless ``with_lse``).

    The ``H / Hkv`` query heads that share a kv head become the rows of one matrix, so each
    kv head's keys are read in place (no ``repeat_interleave`` copy): a KV cache's storage
    (``longctx.cache.KVCache``, head-major) goes to the matmuls as it is."""
    batch, time, heads, dim = q.shape
    kv_heads, group = k.shape[2], heads // k.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    # rows (group, time) of kv head h: query head h * group + i at time t
    qg = (q.to(dtype) * scale).view(batch, time, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    kt, vt = k.to(dtype).transpose(1, 2), v.to(dtype).transpose(1, 2)
    s = torch.matmul(qg.reshape(batch, kv_heads, group * time, dim), kt.transpose(2, 3))
    if causal and time > 1:
        mask = _causal_mask(time, k.shape[1], q.device).repeat(group, 1)
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if with_lse else None
    p = torch.softmax(s, dim=-1) if lse is None else torch.exp(s - lse[..., None])
    out = torch.matmul(p, vt).view(batch, heads, time, dim).to(q.dtype)
    return out, None if lse is None else lse.view(batch, heads, time)


def _attention_blocked(q, k, v, causal: bool, scale: float, slopes):
    """Attention over blocks of queries with an additive bias (ALiBi and/or causal mask).

    ``(B, H, T, D)`` in and out.  The bias of one block is ``H x block x S``, so memory is
    linear in length; under causality a block reads only keys up to its last query.
    """
    time, kv_time = q.shape[2], k.shape[2]
    offset = kv_time - time
    k_pos = torch.arange(kv_time, device=q.device)
    outs, lses = [], []
    for start in range(0, time, _BLOCK):
        stop = min(start + _BLOCK, time)
        q_pos = torch.arange(offset + start, offset + stop, device=q.device)
        end = offset + stop if causal else kv_time
        if slopes is None:
            bias = q.new_zeros(1, stop - start, end)
        else:
            bias = alibi_bias(slopes, q_pos, k_pos[:end]).to(q.dtype)
        if causal:
            bias = bias.masked_fill(k_pos[None, None, :end] > q_pos[None, :, None], float("-inf"))
        out, lse = _kernel(q[:, :, start:stop], k[:, :, :end], v[:, :, :end], False, scale, bias[None])
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _attention_windowed(q, k, v, scale: float, slopes, window: int):
    """Causal sliding-window attention over blocks of queries, ``(B, H, T, D)`` q and
    ``(B, Hkv, S, D)`` k, v.

    A block of ``n`` queries reads only the ``n + window - 1`` keys its window can reach,
    with an additive mask (and ALiBi bias) of ``heads x n x (n + window - 1)``; blocks are
    ``min(256, max(64, window))`` queries.  Work and memory are O(T * (block + window)):
    linear in length, and less than full attention once ``T`` exceeds ``window``.
    """
    time, kv_time = q.shape[2], k.shape[2]
    offset, group = kv_time - time, q.shape[1] // k.shape[1]
    block = min(_BLOCK, max(64, window))
    outs, lses = [], []
    for start in range(0, time, block):
        stop = min(start + block, time)
        lo, hi = max(0, offset + start - window + 1), offset + stop
        q_pos = torch.arange(offset + start, hi, device=q.device)
        k_pos = torch.arange(lo, hi, device=q.device)
        distance = q_pos[:, None] - k_pos[None, :]
        if slopes is None:
            bias = q.new_zeros(1, stop - start, hi - lo)
        else:
            bias = alibi_bias(slopes, q_pos, k_pos).to(q.dtype)
        bias = bias.masked_fill(((distance < 0) | (distance >= window))[None], float("-inf"))
        kb, vb = k[:, :, lo:hi], v[:, :, lo:hi]
        if group > 1:
            kb, vb = kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1)
        out, lse = _kernel(q[:, :, start:stop], kb, vb, False, scale, bias[None])
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: int | None = None,
    with_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact softmax attention with its log-sum-exp, without a full score matrix.

    Args:
        q: ``(batch, time, heads, head_dim)``.
        k, v: ``(batch, kv_time, kv_heads, head_dim)``; ``heads % kv_heads == 0`` (GQA/MQA:
            query head ``h`` reads kv head ``h // (heads // kv_heads)``).
        causal: queries are the last ``time`` of the ``kv_time`` positions.
        scale: score scale, default ``head_dim ** -0.5``.
        alibi_slopes: optional ``(heads,)`` ALiBi slopes; adds ``-slope * (i - j)``.
        window: optional sliding window (causal only): a query sees itself and the
            ``window - 1`` keys before it.  A window that reaches every key changes nothing
            and takes the fused path; a shorter one runs blocked (``_attention_windowed``).
        with_lse: False when the caller needs ``out`` only (a decoding step then skips the
            log-sum-exp and returns None for it).

    Returns:
        out ``(batch, time, heads, head_dim)`` in q's dtype and lse ``(batch, time, heads)``
        in fp32 (``-inf`` for a row that sees no key, whose output is 0).
        Both are differentiable, ``lse`` included.
    """
    check_qkv(q, k, v)
    _check_window(window, causal)
    time, kv_time = q.shape[1], k.shape[1]
    if window is not None and window >= kv_time:
        window = None  # the farthest pair is kv_time - 1 apart: the window masks nothing
    if causal and kv_time < time:
        raise ValueError(
            f"causal attention needs at least as many keys as queries; got time={time}, kv_time={kv_time}"
        )
    if alibi_slopes is not None and alibi_slopes.shape != (q.shape[2],):
        raise ValueError(f"alibi_slopes must have shape ({q.shape[2]},); got {tuple(alibi_slopes.shape)}")
    if time == 0 or kv_time == 0:
        # No keys: output 0 and lse -inf, still attached to the graph (zero gradients).
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        return q * 0 + (k.sum() + v.sum()) * 0, lse
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if time <= FEW_QUERIES and window is None and alibi_slopes is None:
        out, lse = _attention_few_queries(q, k, v, causal, scale, with_lse)
        return out.transpose(1, 2), None if lse is None else lse.transpose(1, 2)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if window is not None:
        out, lse = _attention_windowed(qt, kt, vt, scale, alibi_slopes, window)
    elif alibi_slopes is not None or not _has_flash(q.device):
        # The blocked path takes one kv head per query head.
        kt = kt.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
        vt = vt.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
        out, lse = _attention_blocked(qt, kt, vt, causal, scale, alibi_slopes)
    elif causal and kv_time > time and time > 1:
        out, lse = _attention_causal_offset(qt, kt, vt, scale)
    elif causal and kv_time > time:  # one query after its keys (a decoding step) sees them all
        out, lse = _kernel(qt, kt, vt, False, scale)
    else:
        out, lse = _kernel(qt, kt, vt, causal, scale)
    return out.transpose(1, 2), lse.transpose(1, 2)


def merge(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions of the same queries over disjoint key sets, exactly.

    out ``(..., head_dim)`` and lse ``(...)``: any layout where lse is out without its last
    dim, e.g. ``(batch, time, heads, head_dim)`` with ``(batch, time, heads)``.  A row
    with lse ``-inf`` in one part takes the other part unchanged; with ``-inf`` in both it
    stays 0 / ``-inf``.  Differentiable in all four inputs.
    """
    # Rows where both sides saw no key: logaddexp(-inf, -inf) has a nan gradient, so
    # compute those rows on zeros and put the -inf back afterwards.
    empty = torch.isneginf(lse_a) & torch.isneginf(lse_b)
    safe_a = torch.where(empty, torch.zeros_like(lse_a), lse_a)
    safe_b = torch.where(empty, torch.zeros_like(lse_b), lse_b)
    both = torch.logaddexp(safe_a, safe_b)
    w_a = torch.exp(safe_a - both).masked_fill(empty, 0.0).unsqueeze(-1)
    w_b = torch.exp(safe_b - both).masked_fill(empty, 0.0).unsqueeze(-1)
    out = (w_a * out_a.float() + w_b * out_b.float()).to(out_a.dtype)
    return out, both.masked_fill(empty, float("-inf"))

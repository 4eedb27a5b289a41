"""Attention over a ``RecallCache``: a local part over the window and a global part over
[sinks, retrieved blocks, pending tokens], merged by log-sum-exp (``longctx.ops.merge``).

New tokens go through in chunks of ``CHUNK`` queries; a chunk shares one retrieval, by
its mean query (InfLLM retrieves once per 512 queries).  Each query of a chunk attends
locally to the whole window as it was before the chunk and causally to the chunk itself
(so nothing is out of reach between the window and the blocks), with RoPE positions of
the stream.  The local attention is computed explicitly to also give the attention each
key received (summed over the chunk's queries and each KV head's query heads), from
which the cache picks a block's representative tokens when the block leaves the window.

Global keys are stored before RoPE.  ``positions = "fixed"`` (InfLLM's) rotates every
global key at position 0 and the queries at position ``window``: each retrieved token
sits at the same distance from the query, the distance of the window's oldest token.
``"ordered"`` puts the global keys at ``0 .. G - 1`` in stream order and the queries at
``G - 1 + window``.  ALiBi biases global keys by the distance ``window`` (with ``"fixed"``
only: ``Attention.init_state`` refuses ALiBi with ``"ordered"``).  RoPE's ``seq_len`` (which
``"dynamic"`` scaling follows) is the span attended, window or global part, not the stream.
"""

from __future__ import annotations

import torch

from longctx.cache.recall import RecallCache
from longctx.ops.attention import attention, merge

CHUNK = 512


def _local(q, k, v, n_past: int, scale: float, slopes):
    """Explicit attention of the chunk ``q (batch, time, heads, dim)`` to ``k, v (batch,
    n_past + time, kv_heads, dim)``: key ``j`` is visible to query ``i`` when
    ``j <= n_past + i``.  Returns out ``(batch, time, heads, dim)``, lse ``(batch, time,
    heads)`` and the attention each key received ``(batch, n_past + time, kv_heads)``."""
    batch, time, heads, dim = q.shape
    kv_heads, span = k.shape[2], k.shape[1]
    group = heads // kv_heads
    qg = q.float().reshape(batch, time, kv_heads, group, dim)
    s = torch.einsum("btkgd,bskd->bkgts", qg, k.float()) * scale
    distance = (n_past + torch.arange(time, device=q.device))[:, None] - torch.arange(span, device=q.device)
    if slopes is not None:
        s = s - slopes.float().view(kv_heads, group, 1, 1) * distance.clamp(min=0)
    s = s.masked_fill(distance < 0, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (batch, kv_heads, group, time)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bkgts,bskd->btkgd", p, v.float()).reshape(batch, time, heads, dim)
    received = p.sum(dim=(2, 3)).transpose(1, 2)  # (batch, span, kv_heads)
    return out.to(q.dtype), lse.permute(0, 3, 1, 2).reshape(batch, time, heads), received


def _global(layer, q, state: RecallCache):
    """Attention of the chunk's queries ``(batch, time, heads, dim)`` (before RoPE) to the
    global keys, retrieved by the chunk's mean query: out ``(batch, time, heads, dim)``,
    lse ``(batch, time, heads)``."""
    batch, time, _, dim = q.shape
    # Blocks are ranked by the logits their representatives would get: keys at position 0,
    # the query at the window's distance (InfLLM's geometry; unrotated it would be distance 0).
    picker = q if layer.pos != "rope" else layer.rotate(q, torch.full((time,), state.window, device=q.device),
                                                        state.window + 1)
    query = picker.float().mean(1).reshape(batch, state.sink_k.shape[2], -1, dim).mean(2)  # (batch, kv_heads, dim)
    k, v = state.global_kv(query)
    if state.positions == "fixed":
        key_pos, q_at = torch.zeros(k.shape[1], dtype=torch.long, device=q.device), state.window
    else:
        key_pos, q_at = torch.arange(k.shape[1], device=q.device), k.shape[1] - 1 + state.window
    if layer.pos == "rope":
        q = layer.rotate(q, torch.full((time,), q_at, device=q.device), q_at + 1)
        k = layer.rotate(k, key_pos, q_at + 1)
    out, lse = attention(q, k, v, causal=False)
    if layer.alibi_slopes is not None:  # "fixed" (ALiBi takes no other): every key at distance window
        lse = lse - layer.alibi_slopes.float() * state.window
    return out, lse


def recall_attention(layer, q, k, v, state: RecallCache) -> torch.Tensor:
    """The new tokens' attention output ``(batch, time, heads, head_dim)`` through ``state``,
    which then holds them (``q``, ``k``, ``v`` before RoPE)."""
    outs = []
    scale = q.shape[-1] ** -0.5
    for start in range(0, q.shape[1], CHUNK):
        qc, kc, vc = (x[:, start : start + CHUNK] for x in (q, k, v))
        time = qc.shape[1]
        past_k, past_v = state.local_kv()
        n_past = 0 if past_k is None else past_k.shape[1]
        q_rot, k_rot = qc, kc
        if layer.pos == "rope":
            positions = layer.positions(state.seq_len, time, q.device)
            q_rot, k_rot = layer.rotate(qc, positions, n_past + time), layer.rotate(kc, positions, n_past + time)
        local_k = k_rot if past_k is None else torch.cat([past_k, k_rot], 1)
        local_v = vc if past_v is None else torch.cat([past_v, vc], 1)
        out, lse, received = _local(q_rot, local_k, local_v, n_past, scale, layer.alibi_slopes)
        if state.split:
            out, lse = merge(out, lse, *_global(layer, qc, state))
        state.add(kc, k_rot, vc, received)
        outs.append(out)
    return torch.cat(outs, 1)

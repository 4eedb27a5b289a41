"""Exact ring attention over the ranks of a process group (Liu et al. 2023, "Ring Attention with
Blockwise Transformers for Near-Infinite Context", arXiv 2310.01889).

Layout throughout: ``(batch, local_time, heads, head_dim)``, each rank holding its shard of the
sequence in a ``longctx.distributed.layout`` layout.

Forward: the key/value blocks travel around the ring, rank r -> r + 1, P - 1 times.  At each
of the P steps a rank attends its queries to the block in hand with the fused kernel
(``attention``) and merges the partial result by log-sum-exp; the block's transfer to the next
rank is started before that compute and waited for after it, so communication overlaps
compute.  Under a causal mask, query chunk i sees key chunk j < i fully, chunk i causally and
chunk j > i not at all (global chunk indices); a block nobody here can see still travels on.

Backward: a second ring.  Each rank recomputes its queries' partial attention over each block,
takes that block's share of the gradient through the lse-weighted mix, and accumulates dq
locally; dk/dv of a block travel with it (one step behind, since they are only complete after
this rank's compute) and, after one last hop, arrive at the rank that owns the block.

Traffic per rank and call: forward (P - 1) K/V blocks; backward (P - 1) K/V blocks and P fp32
dk/dv blocks.  Every rank of the group must take part in both rings: call ``ring_attention``
on all of them, and make every rank's loss depend on its output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from longctx.distributed.layout import check_layout, chunk_ids
from longctx.ops.attention import attention, merge

# Distinct tags: a K/V block and a gradient block can be in flight between the same two ranks
# at once, and with equal sizes a mix-up would go unnoticed.
_KV_TAG, _GRAD_TAG = 0, 1

# One kernel call of the local queries against a key/value block: (query rows, key rows from
# the block's start, causal).
Call = tuple[slice, int, bool]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            "ring_attention expects q (batch, local_time, heads, head_dim) and k, v of one shape "
            f"(batch, local_time, kv_heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, time, heads, dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, time, dim):
        raise ValueError(
            f"k/v shards {tuple(k.shape)} must match q {tuple(q.shape)} in batch, local_time and head_dim"
        )
    if heads % k.shape[2]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _rank_world(group) -> tuple[int, int]:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _plan(q_chunks: list[int], kv_chunks: list[int], causal: bool, size: int) -> list[Call]:
    """The kernel calls of the local queries (chunks ``q_chunks``, ``size`` rows each) against a
    block holding chunks ``kv_chunks``.

    Both layouts keep a rank's chunks in increasing order, so the chunks a query chunk sees
    form a prefix of the block, ending with its own (causal) chunk if the block has it: one
    call with bottom-right causal alignment.  The next query chunk joins the previous call
    when that single call has the same mask: both see the same keys fully, or both end on
    their diagonal chunk (the zigzag step on a rank's own block is one square causal call).
    """
    calls: list[Call] = []
    for n, i in enumerate(q_chunks):
        seen = sum(j <= i for j in kv_chunks) if causal else len(kv_chunks)
        if seen == 0:
            continue
        rows, keys, diag = slice(n * size, (n + 1) * size), seen * size, causal and i in kv_chunks
        if calls:
            last_rows, last_keys, last_diag = calls[-1]
            if last_rows.stop == rows.start and last_diag == diag and keys - last_keys == (size if diag else 0):
                calls[-1] = (slice(last_rows.start, rows.stop), keys, diag)
                continue
        calls.append((rows, keys, diag))
    return calls


def _block_plan(group, causal: bool, layout: str, size: int, step: int) -> list[Call]:
    """The calls of this rank at ring step ``step``, when it holds the block of rank ``rank - step``."""
    rank, world = _rank_world(group)
    source = (rank - step) % world
    return _plan(chunk_ids(rank, world, layout), chunk_ids(source, world, layout), causal, size)


def _shift(x: torch.Tensor, group, tag: int) -> Callable[[], torch.Tensor]:
    """Start sending ``x`` to the next rank and receiving the previous rank's; returns a
    function that waits for both and gives the received tensor (``x`` itself on one rank)."""
    rank, world = _rank_world(group)
    if world == 1:
        return lambda: x
    received = torch.empty_like(x)
    # P2POp takes global ranks (group_peer is newer than the torch versions this package supports).
    world_group = dist.group.WORLD if group is None else group
    ops = [
        dist.P2POp(dist.isend, x, dist.get_global_rank(world_group, (rank + 1) % world), group, tag),
        dist.P2POp(dist.irecv, received, dist.get_global_rank(world_group, (rank - 1) % world), group, tag),
    ]
    requests = dist.batch_isend_irecv(ops)

    def wait() -> torch.Tensor:
        for request in requests:
            request.wait()
        return received

    return wait


def _ring_forward(q, kv, group, causal: bool, layout: str, scale: float, size: int):
    """q ``(B, T, H, D)``, kv = stacked k, v ``(2, B, T, Hkv, D)`` -> out ``(B, T, H, D)`` fp32 and
    lse ``(B, T, H)`` fp32 over the whole ring."""
    world = dist.get_world_size(group)
    out = q.new_zeros(q.shape, dtype=torch.float32)
    lse = q.new_full(q.shape[:3], -math.inf, dtype=torch.float32)
    for step in range(world):
        if step + 1 < world:
            receive = _shift(kv, group, _KV_TAG)
        for rows, keys, diag in _block_plan(group, causal, layout, size, step):
            part, part_lse = attention(q[:, rows], kv[0, :, :keys], kv[1, :, :keys], causal=diag, scale=scale)
            out[:, rows], lse[:, rows] = merge(out[:, rows], lse[:, rows], part, part_lse)
        if step + 1 < world:
            kv = receive()
    return out, lse


def _call_grads(q, k, v, out, lse, d_out, d_lse, causal: bool, scale: float):
    """Gradients for q, k, v of one call's share of the loss, given the final ``out`` and ``lse``
    (fp32) of these queries and their gradients.

    The final output mixes the partial attentions, out = sum_i w_i out_i with
    w_i = exp(lse_i - lse), so d out_i = w_i d_out and d lse_i = w_i (d_lse + <d_out, out_i - out>).
    """
    inputs = tuple(x.detach().requires_grad_() for x in (q, k, v))
    with torch.enable_grad():
        part, part_lse = attention(*inputs, causal=causal, scale=scale)
    weight = torch.exp(part_lse.detach() - lse)
    d_part = weight[..., None] * d_out
    d_part_lse = weight * (d_lse + (d_out * (part.detach().float() - out)).sum(-1))
    return torch.autograd.grad((part, part_lse), inputs, (d_part.to(part.dtype), d_part_lse))


def _ring_backward(q, kv, out, lse, d_out, d_lse, group, causal: bool, layout: str, scale: float, size: int):
    """The second ring: dq ``(B, T, H, D)`` and this rank's d(k, v) ``(2, B, T, Hkv, D)``, fp32."""
    world = dist.get_world_size(group)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    receive_grad = None
    for step in range(world):
        if step + 1 < world:
            receive_kv = _shift(kv, group, _KV_TAG)
        block = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for rows, keys, diag in _block_plan(group, causal, layout, size, step):
            gq, gk, gv = _call_grads(q[:, rows], kv[0, :, :keys], kv[1, :, :keys], out[:, rows], lse[:, rows],
                                     d_out[:, rows], d_lse[:, rows], diag, scale)
            dq[:, rows] += gq
            block[0, :, :keys] += gk
            block[1, :, :keys] += gv
        # The block's gradient so far comes from the previous rank, sent after its compute.
        d_kv = block if receive_grad is None else receive_grad().add_(block)
        receive_grad = _shift(d_kv, group, _GRAD_TAG)
        if step + 1 < world:
            kv = receive_kv()
    # The last hop brings each block's gradient home.
    return dq, receive_grad()


class _RingAttention(torch.autograd.Function):
    """Both rings; the forward keeps only q, k, v and the final out and lse for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, layout: str, scale: float, size: int):
        out, lse = _ring_forward(q, torch.stack([k, v]), group, causal, layout, scale, size)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, layout, scale, size)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, d_kv = _ring_backward(q, torch.stack([k, v]), out, lse, d_out.float(), d_lse.float(), *ctx.args)
        return dq.to(q.dtype), d_kv[0].to(k.dtype), d_kv[1].to(v.dtype), None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    layout: str = "contiguous",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``; differentiable.

    Args:
        q: ``(batch, local_time, heads, head_dim)``, this rank's shard of the queries.
        k, v: ``(batch, local_time, kv_heads, head_dim)``, its shards of the keys and values;
            ``heads % kv_heads == 0`` (GQA: the blocks travel with their kv heads only).
            Every rank passes the same ``local_time`` (a multiple of 2 for ``zigzag``).
        group: the process group, default the default group; a group of one works.
        causal: each position sees the positions at or before it in the full sequence.
        layout: how the sequence is sharded, ``contiguous`` or ``zigzag``
            (``longctx.distributed.layout``); zigzag balances causal work across ranks.
        scale: score scale, default ``head_dim ** -0.5``.

    Returns:
        out ``(batch, local_time, heads, head_dim)`` in q's dtype and lse
        ``(batch, local_time, heads)`` fp32: what ``attention`` over the full sequence gives at
        this rank's positions.  Both are differentiable; the backward is a collective too.
    """
    check_layout(layout)
    _check_shapes(q, k, v)
    rank, world = _rank_world(group)
    chunks = len(chunk_ids(rank, world, layout))
    time = q.shape[1]
    if time == 0 or time % chunks:
        raise ValueError(f"local_time must be a positive multiple of {chunks} for the {layout} layout; got {time}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, group, causal, layout, scale, time // chunks)

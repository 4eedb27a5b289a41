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

Backward: a second ring.  The kernel's backward takes the softmax statistics as inputs: given
the final out and lse it gives exactly one block's share of the gradients (p = exp(s - lse) is
then that block's part of the full softmax), so nothing of the forward is recomputed or kept
per step.  Each rank accumulates dq locally; dk/dv of a block travel with it (one step behind,
since they are only complete after this rank's compute) and, after one last hop, arrive at the
rank that owns the block.

Traffic per rank and call: forward (P - 1) K/V blocks; backward (P - 1) K/V blocks and P
dk/dv blocks (fp32; fp64 for fp64 inputs).  Every rank of the group must take
part in both rings: call ``ring_attention`` on all of them, and make every rank's loss depend
on its output.

Memory (T/P local tokens; a "block" is this rank's k and v): the forward keeps q, the block
(the copy the ring sends, so that k and v, often views of a fused q/k/v projection, are not
kept), the final out and lse: what the single-process kernel keeps, without the rest of the
projection.  Beyond that, while the ring runs: one block arriving and one in hand (in the
backward the kept block is reused as one of the two when the graph is not retained), in the
backward the dk/dv of one block being sent and one being received, and the kernel's per-step
outputs (dq, and the block's dk/dv share); no per-step outputs are kept.  All of it is a
fixed number of T/P-sized buffers, whatever P.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from longctx.distributed.layout import check_layout, chunk_ids
from longctx.ops.attention import _BLOCK, _flash_bwd, _has_flash, attention

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


def _shift(xs: tuple[torch.Tensor, ...], group, tag: int,
           into: tuple[torch.Tensor, ...] | None = None) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Start sending the tensors ``xs`` to the next rank and receiving the previous rank's into
    ``into`` (new buffers if None), tags ``tag, tag + 1, ...``; returns a function that waits for
    all of it and gives the received tensors (``xs`` themselves on one rank).  The sends and
    receives are dropped once waited for, so a sent buffer is free as soon as nothing else
    holds it."""
    rank, world = _rank_world(group)
    if world == 1:
        return lambda: xs
    received = tuple(torch.empty_like(x) for x in xs) if into is None else into
    # P2POp takes global ranks (group_peer is newer than the torch versions this package supports).
    world_group = dist.group.WORLD if group is None else group
    send_to = dist.get_global_rank(world_group, (rank + 1) % world)
    receive_from = dist.get_global_rank(world_group, (rank - 1) % world)
    ops = [dist.P2POp(dist.isend, x, send_to, group, tag + i) for i, x in enumerate(xs)]
    ops += [dist.P2POp(dist.irecv, x, receive_from, group, tag + i) for i, x in enumerate(received)]
    requests = [dist.batch_isend_irecv(ops)]
    del ops

    def wait() -> tuple[torch.Tensor, ...]:
        for request in requests.pop():
            request.wait()
        return received

    return wait


def _compact(x: torch.Tensor) -> torch.Tensor:
    """``x`` if it is contiguous and its storage holds nothing else, else a contiguous copy.
    Saving a view keeps its whole storage alive until the backward: q as a slice of a fused
    q/k/v projection would keep all of the projection."""
    if x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * x.element_size():
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _merge_into(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """``out, lse = merge(out, lse, part, part_lse)`` in place (``out`` and ``lse`` in the
    accumulation dtype, possibly views): no temporary the size of ``out``."""
    empty = torch.isneginf(lse) & torch.isneginf(part_lse)
    safe_a, safe_b = lse.masked_fill(empty, 0.0), part_lse.masked_fill(empty, 0.0)
    both = torch.logaddexp(safe_a, safe_b)
    w_a = torch.exp(safe_a - both).masked_fill_(empty, 0.0).unsqueeze(-1)
    w_b = torch.exp(safe_b - both).masked_fill_(empty, 0.0).unsqueeze(-1)
    out.mul_(w_a).addcmul_(part, w_b)
    lse.copy_(both.masked_fill_(empty, -math.inf))


def _ring_forward(q, kv, group, causal: bool, layout: str, scale: float, size: int):
    """q ``(B, T, H, D)``, kv = this rank's stacked k, v ``(2, B, T, Hkv, D)`` -> out ``(B, T, H, D)``
    and lse ``(B, T, H)`` over the whole ring, both in the accumulation dtype (fp32, or fp64
    for fp64 inputs).

    Received blocks go into two buffers that take turns (one in hand, one arriving); ``kv``
    itself is kept for the backward and never written."""
    world = dist.get_world_size(group)
    acc = torch.promote_types(q.dtype, torch.float32)
    out = q.new_zeros(q.shape, dtype=acc)
    lse = q.new_full(q.shape[:3], -math.inf, dtype=acc)
    block, spare = kv, None
    for step in range(world):
        if step + 1 < world:
            receive = _shift((block,), group, _KV_TAG, None if spare is None else (spare,))
        for rows, keys, diag in _block_plan(group, causal, layout, size, step):
            part, part_lse = attention(q[:, rows], block[0, :, :keys], block[1, :, :keys], causal=diag, scale=scale)
            _merge_into(out[:, rows], lse[:, rows], part, part_lse)
            del part, part_lse
        if step + 1 < world:
            previous, (block,) = block, receive()
            spare = None if previous is kv else previous
    return out, lse


def _flash_grads(q, k, v, out, lse, d_out, d_lse, causal: bool, scale: float):
    """``_block_grads`` on the CPU flash kernel's backward, which takes the softmax
    statistics as inputs: given the whole attention's out and lse it gives exactly the
    gradients through the keys it is shown, with no forward recompute."""
    if causal and k.shape[1] > q.shape[1]:
        # Bottom-right alignment (the kernel only has the square one): the keys before the
        # last T are seen by every query.
        split = k.shape[1] - q.shape[1]
        qa, ka, va = _flash_grads(q, k[:, :split], v[:, :split], out, lse, d_out, d_lse, False, scale)
        qb, kb, vb = _flash_grads(q, k[:, split:], v[:, split:], out, lse, d_out, d_lse, True, scale)
        return qa.add_(qb), torch.cat([ka, kb], 1), torch.cat([va, vb], 1)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (batch, heads, time, dim): the kernel's layout
    if d_lse is None:
        dq, dk, dv = _flash_bwd(t(d_out), t(q), t(k), t(v), t(out), t(lse), 0.0, causal, scale=scale)
        return t(dq), t(dk), t(dv)
    # d lse / d s = p: as in longctx.ops.attention, a column of ones appended to v, d_lse to
    # d_out and zeros to q, k and out add d_lse to the kernel's dp and nothing else.
    def pad(x, value):
        return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], dim=-1)

    dq, dk, dv = _flash_bwd(t(torch.cat([d_out, d_lse.unsqueeze(-1).to(d_out.dtype)], dim=-1)), t(pad(q, 0.0)),
                            t(pad(k, 0.0)), t(pad(v, 1.0)), t(pad(out, 0.0)), t(lse), 0.0, causal, scale=scale)
    return t(dq)[..., :-1], t(dk)[..., :-1], t(dv)[..., :-1]


def _dense_grads(q, k, v, out, lse, d_out, d_lse, causal: bool, scale: float):
    """``_block_grads`` as plain tensor algebra, ``_BLOCK`` query rows at a time (devices
    without the CPU flash kernel)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // k.shape[2]
    qt, ot, gt = (x.transpose(1, 2).to(acc) for x in (q, out, d_out))  # (B, H, T, D)
    kt, vt = (x.transpose(1, 2).to(acc).repeat_interleave(group, dim=1) for x in (k, v))  # (B, H, S, D)
    delta = (gt * ot).sum(-1)  # (B, H, T)
    if d_lse is not None:
        delta = delta - d_lse.transpose(1, 2)
    lse_t = lse.transpose(1, 2).to(acc)
    time, kv_time = q.shape[1], k.shape[1]
    dq = torch.empty_like(qt)
    dk, dv = torch.zeros_like(kt), torch.zeros_like(vt)
    for start in range(0, time, _BLOCK):
        rows = slice(start, min(start + _BLOCK, time))
        p = torch.exp(torch.einsum("bhtd,bhsd->bhts", qt[:, :, rows], kt) * scale - lse_t[:, :, rows, None])
        if causal:
            i = torch.arange(rows.start, rows.stop, device=q.device)[:, None] + (kv_time - time)
            p = p.masked_fill(torch.arange(kv_time, device=q.device)[None, :] > i, 0.0)
        dv += torch.einsum("bhts,bhtd->bhsd", p, gt[:, :, rows])
        ds = p * (torch.einsum("bhtd,bhsd->bhts", gt[:, :, rows], vt) - delta[:, :, rows, None]) * scale
        dq[:, :, rows] = torch.einsum("bhts,bhsd->bhtd", ds, kt)
        dk += torch.einsum("bhts,bhtd->bhsd", ds, qt[:, :, rows])
    heads = k.shape[2]
    dk = dk.view(dk.shape[0], heads, group, *dk.shape[2:]).sum(2)
    dv = dv.view(dv.shape[0], heads, group, *dv.shape[2:]).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _block_grads(q, k, v, out, lse, d_out, d_lse, causal: bool, scale: float):
    """The gradients for q and for one block of keys k, v of the loss of an attention over
    more keys than the block (the ring's), from that attention's final ``out``, ``lse`` and
    their gradients ``d_out``, ``d_lse`` (None: zero): with p = exp(scale q k - lse), the
    block's share is ds = p (d_out . v - <d_out, out> + d_lse), summed over the blocks.

    q, out, d_out ``(B, T, H, D)``, lse, d_lse ``(B, T, H)``, k, v ``(B, S, Hkv, D)``;
    ``causal``: bottom-right aligned as in ``attention``.  Returns dq, dk, dv shaped like q, k, v
    (q's dtype on the CPU kernel, else the accumulation dtype)."""
    if _has_flash(q.device):
        return _flash_grads(q, k, v, out, lse, d_out, d_lse, causal, scale)
    return _dense_grads(q, k, v, out, lse, d_out, d_lse, causal, scale)


def _ring_backward(q, kv, out, lse, d_out, d_lse, group, causal: bool, layout: str, scale: float, size: int,
                   reuse_kv: bool):
    """The second ring: dq ``(B, T, H, D)`` and this rank's dk, dv ``(B, T, Hkv, D)``, in the
    accumulation dtype (lse's); ``out`` and ``d_out`` are in q's dtype, ``d_lse`` None means
    zero.  With ``reuse_kv``, ``kv`` (this rank's saved block, not needed after step 0) becomes
    one of the two buffers received blocks take turns in.

    Each step's kernel calls give dq (accumulated here) and this rank's share of the block's
    dk, dv; the share is added to the block's gradient so far (received from the previous rank,
    which sent it after its own compute of the step before) and sent on, so it is in flight
    during the next step's compute; after the last step one more hop takes it home."""
    world = dist.get_world_size(group)
    acc = lse.dtype
    block_shape, block_len = kv.shape[1:], kv.shape[2]
    dq = None
    block, spare = kv, None
    receive_grads = None
    for step in range(world):
        if step + 1 < world:
            receive = _shift((block,), group, _KV_TAG, None if spare is None else (spare,))
        # This rank's share of the block's dk, dv: its first ``seen`` keys (the plans make at
        # most one call per step, whose outputs are kept as they are).
        dk = dv = None
        seen = 0
        for rows, keys, diag in _block_plan(group, causal, layout, size, step):
            gq, gk, gv = _block_grads(q[:, rows], block[0, :, :keys], block[1, :, :keys], out[:, rows], lse[:, rows],
                                      d_out[:, rows], None if d_lse is None else d_lse[:, rows], diag, scale)
            if dq is None and rows.stop - rows.start == q.shape[1] and gq.dtype == acc:
                dq = gq  # the first call's output is the accumulator when it covers every row
            else:
                if dq is None:
                    dq = q.new_zeros(q.shape, dtype=acc)
                dq[:, rows] += gq
            if dk is None:
                dk, dv, seen = gk, gv, keys
            else:
                if keys > seen or dk.dtype != acc:
                    dk, dv = (_grown(x, block_shape, acc, kv.device) for x in (dk, dv))
                    seen = block_len
                dk[:, :keys] += gk
                dv[:, :keys] += gv
            del gq, gk, gv
        if receive_grads is None:  # step 0: this rank's own block; its gradient starts here
            if dk is None or seen < block_len or dk.dtype != acc or not (dk.is_contiguous() and dv.is_contiguous()):
                dk, dv = (_grown(x, block_shape, acc, kv.device) for x in (dk, dv))
            grads = (dk, dv)
        else:  # the block's gradient from the ranks before, plus this rank's share
            grads = receive_grads()
            if dk is not None:
                grads[0][:, :seen] += dk
                grads[1][:, :seen] += dv
        del dk, dv
        receive_grads = _shift(grads, group, _GRAD_TAG)
        del grads
        if step + 1 < world:
            previous, (block,) = block, receive()
            spare = previous if previous is not kv or reuse_kv else None
            del previous
    del block, spare
    if dq is None:
        dq = q.new_zeros(q.shape, dtype=acc)
    # The last hop brings each block's gradient home.
    dk, dv = receive_grads()
    return dq, dk, dv


def _grown(x: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """A zero tensor of ``shape`` with ``x`` (the gradient of its first keys, or None) added in."""
    full = torch.zeros(shape, dtype=dtype, device=device)
    if x is not None:
        full[:, :x.shape[1]] += x
    return full


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph``): then the saved tensors
    must survive it.  True when this torch cannot tell."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


class _RingAttention(torch.autograd.Function):
    """Both rings.  The forward keeps q, this rank's stacked k, v (the block the ring sends; k and
    v themselves are often views of a larger fused projection, which this lets go) and the final
    out and lse; no per-step outputs."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, layout: str, scale: float, size: int):
        kv = torch.stack([k, v])
        out, lse = _ring_forward(q, kv, group, causal, layout, scale, size)
        out = out.to(q.dtype)  # what the kernel's backward reads (the same tensor for fp32)
        ctx.save_for_backward(_compact(q), kv, out, lse)
        ctx.args = (group, causal, layout, scale, size)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        q, kv, out, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(q)
        if d_lse is not None and not bool(d_lse.any()):
            d_lse = None
        dtype = q.dtype
        dq, dk, dv = _ring_backward(q, kv, out, lse, d_out, d_lse, *ctx.args, reuse_kv=not _keeps_graph())
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None, None


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
        ``(batch, local_time, heads)`` fp32 (fp64 for fp64 inputs): what ``attention`` over the
        full sequence gives at this rank's positions.  Both are differentiable; the backward is a collective too.
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

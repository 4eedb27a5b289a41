"""Exact sequence parallelism for state-space mixers: selective scan, Mamba-2 SSD, causal conv.

The sequence is split over the ranks of a process group in one of the layouts of
``longctx.distributed.layout`` (``contiguous``: rank r holds chunk r of P; ``zigzag``:
rank r holds chunks r and 2P-1-r).  A rank's tensors are its chunks concatenated along
time (dim 1) in local order; every rank passes the same shapes.

The recurrences are linear in the state, so a chunk's state at its end is
``decay_c * h_in + h0_c``: ``h0_c`` is the state reached from a zero start and
``decay_c`` the chunk's total decay, both computed locally.  One all_gather of every
chunk's ``(h0_c, decay_c)`` gives each rank the true entering state of its chunks (a
prefix combination over the chunks before them in global order), and the chunk is then
finished from that state: the selective scan rescans it with ``initial_state`` (its
state is per channel x state index, so a correction would need a time x channels x
state tensor); SSD adds the entering state's contribution ``exp(cumsum a)_t C_t h_in``
to its zero-start output (one matmul per head, what ``ssd`` itself does per chunk).

Gradients are exact.  The exchange is an autograd.Function whose backward all_gathers
every rank's gradients of the entering states and takes the vector-Jacobian product of
the prefix combination on each rank (all ranks compute it for all chunks; each keeps its
own chunks'), so d(entering state) reaches the inputs of the earlier chunks on other
ranks.  Consequences for callers:

- backward is collective: every rank of the group must backpropagate through its
  output (a loss on every rank; the usual case when each rank's loss uses its ``y``).
  Every local chunk's output depends on the exchange and every local input feeds it,
  so each call adds one all_gather to every rank's backward, ordered by the data
  dependencies alike on all ranks (stacked layers and convs compose);
- parameters every rank holds (``A``, ``D``, biases, conv weights) get this rank's part
  of the gradient; summed over the group (an all_reduce, as data parallelism does
  anyway) that is the gradient of the full-sequence op.  Gradients of the sharded inputs
  are already complete on their owner.

With one rank the local tensors are the whole sequence and the single-process op is
called as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from longctx.distributed.layout import check_layout, chunk_ids, num_chunks
from longctx.ops.scan import selective_scan
from longctx.ops.scan.reference import discretize_delta  # the same delta' rule as selective_scan
from longctx.ops.ssd import _NO_LIMIT, _discretize_dt, ssd  # the same dt rule as ssd

__all__ = ["local_chunks", "previous_tokens", "sequence_parallel_scan", "sequence_parallel_ssd"]

# Log-decays are floored here in the SSD correction, as ssd floors its own (exp(-60) ~
# 1e-26: below fp32 resolution of any non-decayed term, and no subnormal arithmetic).
_LOG_DECAY_FLOOR = -60.0


# ----------------------------------------------------------------------------- helpers


def _rank_world(group, layout: str) -> tuple[int, int]:
    check_layout(layout)
    return dist.get_rank(group), dist.get_world_size(group)


def local_chunks(x: torch.Tensor | None, layout: str = "contiguous", dim: int = 1) -> list | None:
    """This rank's local tensor split into its chunks (views), in local order: one chunk for
    ``contiguous``, two for ``zigzag``.  ``None`` stays ``None``."""
    check_layout(layout)
    if x is None:
        return None
    n = len(chunk_ids(0, 1, layout))
    if x.shape[dim] % n:
        raise ValueError(f"the local time axis ({x.shape[dim]}) must hold {n} equal chunks ({layout} layout); "
                         f"got shape {tuple(x.shape)}")
    return list(x.split(x.shape[dim] // n, dim=dim))


def _gather_chunks(local: torch.Tensor, group, rank: int, world: int, layout: str) -> torch.Tensor:
    """``(n_local, ...)`` per rank -> ``(num_chunks, ...)`` in global chunk order (plain all_gather)."""
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = local.new_empty(num_chunks(world, layout), *local.shape[1:])
    for r, part in enumerate(parts):
        full[chunk_ids(r, world, layout)] = part
    return full


class _ExchangeMap(torch.autograd.Function):
    """``out_local = fn(all_gather(local))[this rank's chunks]`` with its exact gradient.

    ``local`` is ``(n_local, ...)``, one entry per local chunk; ``fn`` maps the
    ``(num_chunks, ...)`` entries of all chunks in global order to ``(num_chunks, ...)``
    outputs.  Backward all_gathers the output gradients of every rank (each chunk's output
    lives on exactly one rank), takes the vector-Jacobian product of ``fn`` at the
    gathered input (recomputed under autograd; ``fn`` is small) and keeps this rank's
    rows: the gradient of the sum of all ranks' losses.  One all_gather forward, one
    backward, on every rank.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, fn: Callable, group, layout: str) -> torch.Tensor:
        rank, world = _rank_world(group, layout)
        full = _gather_chunks(local, group, rank, world, layout)
        ctx.fn, ctx.group, ctx.layout, ctx.full = fn, group, layout, full
        return fn(full)[chunk_ids(rank, world, layout)]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_local: torch.Tensor):
        rank, world = _rank_world(ctx.group, ctx.layout)
        grad_full = _gather_chunks(grad_local, ctx.group, rank, world, ctx.layout)
        with torch.enable_grad():
            full = ctx.full.detach().requires_grad_()
            (grad_in,) = torch.autograd.grad(ctx.fn(full), full, grad_full)
        return grad_in[chunk_ids(rank, world, ctx.layout)], None, None, None


def _entering_states(full: torch.Tensor, state_shape: tuple, decay_shape: tuple) -> torch.Tensor:
    """``(K, S + Dk)`` packed ``(h0_k, decay_k)`` of all chunks in global order ->
    ``(K, *state_shape)`` entering states: ``h_in_0 = 0``, ``h_in_{k+1} = decay_k h_in_k + h0_k``."""
    K, size = full.shape[0], math.prod(state_shape)
    h0 = full[:, :size].view(K, *state_shape)
    decay = full[:, size:].view(K, *decay_shape)
    states = [torch.zeros_like(h0[0])]
    for k in range(K - 1):
        states.append(torch.addcmul(h0[k], decay[k], states[-1]))
    return torch.stack(states)


def _exchange_states(h0s: list, decays: list, group, layout: str) -> list:
    """Entering state of each local chunk from its zero-start final state and total decay
    (``decays[i]`` broadcastable to ``h0s[i]``); differentiable across ranks."""
    state_shape, decay_shape = tuple(h0s[0].shape), tuple(decays[0].shape)
    packed = torch.stack([torch.cat([h.reshape(-1), d.to(h.dtype).reshape(-1)]) for h, d in zip(h0s, decays)])
    fn = partial(_entering_states, state_shape=state_shape, decay_shape=decay_shape)
    return list(_ExchangeMap.apply(packed, fn, group, layout).unbind(0))


# ----------------------------------------------------------------------------- Mamba-1


def sequence_parallel_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    group=None,
    layout: str = "contiguous",
) -> torch.Tensor:
    """``selective_scan`` of a sequence split over the ranks of ``group``; this rank's ``y``.

    Args (this rank's shard: its chunks concatenated along time in layout order; local
    time ``T_loc`` divisible by the number of local chunks, the same on every rank):
        u, delta: ``(batch, T_loc, channels)``; z: optional, the same shape.
        A: ``(channels, state)``; D, delta_bias: optional ``(channels,)``; replicated.
        B, C: ``(batch, T_loc, state)`` or ``(batch, T_loc, groups, state)``.
        delta_softplus: as in ``selective_scan``.
        group: the process group (``None``: the default group).  layout: ``"contiguous"``
            or ``"zigzag"``.

    Returns:
        y ``(batch, T_loc, channels)`` in u's dtype: this rank's rows of
        ``selective_scan`` on the full sequence (from a zero state).

    Forward, per local chunk c: ``(_, h0_c) = selective_scan(chunk, initial_state=None)``
    without D and z (they do not touch the state); ``decay_c = exp(A * sum_t delta'_t)``
    ``(batch, channels, state)`` with ``delta' = softplus?(delta + delta_bias)``; one
    all_gather of all chunks' ``(h0, decay)``; entering state ``h_in_{k+1} = decay_k
    h_in_k + h0_k`` over global chunk order (``h_in_0 = 0``); ``y_c = selective_scan(chunk,
    D, z, initial_state=h_in_c)``.  Mathematically the full scan; rounding differs from it
    by the reassociation of the decays (``exp`` of a sum vs. a product of ``exp``).  Costs
    two scans per chunk plus one all_gather of ``2 * n_local * batch * channels * state``
    floats.

    Backward: exact.  Autograd through both scans and the decays; the state exchange
    all_gathers the gradients of the entering states so the earlier chunks' inputs
    (on other ranks) get theirs.  Collective: every rank must run backward through its y.
    Gradients of A, D and delta_bias are this rank's part (sum them over the group).

    One rank: ``selective_scan(...)[0]`` on the local tensors, which are the whole sequence.
    """
    rank, world = _rank_world(group, layout)
    if world == 1:
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[0]
    us, deltas, Bs, Cs, zs = (local_chunks(t, layout) for t in (u, delta, B, C, z))
    h0s, decays = [], []
    for u_c, d_c, B_c, C_c in zip(us, deltas, Bs, Cs):
        _, h0 = selective_scan(u_c, d_c, A, B_c, C_c, None, None, delta_bias, delta_softplus)
        dt = discretize_delta(d_c, delta_bias, delta_softplus, torch.float32)
        decays.append(torch.exp(dt.sum(1)[..., None] * A.float()))  # (batch, channels, state)
        h0s.append(h0)
    entering = _exchange_states(h0s, decays, group, layout)
    ys = [
        selective_scan(u_c, d_c, A, B_c, C_c, D, None if zs is None else zs[i], delta_bias, delta_softplus,
                       initial_state=entering[i])[0]
        for i, (u_c, d_c, B_c, C_c) in enumerate(zip(us, deltas, Bs, Cs))
    ]
    return torch.cat(ys, dim=1)


# ----------------------------------------------------------------------------- Mamba-2


def sequence_parallel_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    chunk_size: int = 64,
    group=None,
    layout: str = "contiguous",
) -> torch.Tensor:
    """Mamba-2's ``ssd`` of a sequence split over the ranks of ``group``; this rank's ``y``.

    Args (this rank's shard, as in ``sequence_parallel_scan``; ``T_loc`` local steps):
        x: ``(batch, T_loc, heads, head_dim)``; dt: ``(batch, T_loc, heads)``.
        A: ``(heads,)``, ``<= 0``; D: optional ``(heads,)`` or ``(heads, head_dim)``;
            dt_bias: optional ``(heads,)``; replicated.
        B, C: ``(batch, T_loc, groups, state)``.
        dt_softplus, dt_limit, chunk_size: as in ``ssd`` (chunk_size is ssd's internal
            block length inside each sequence chunk).
        group: the process group (``None``: the default group); layout: ``"contiguous"``
            or ``"zigzag"``.

    Returns:
        y ``(batch, T_loc, heads, head_dim)`` in x's dtype: this rank's rows of ``ssd`` on
        the full sequence (from a zero state).

    Forward, per local chunk c, in ssd's compute dtype (fp32, fp64 for fp64 x):
    ``(y0_c, h0_c) = ssd(chunk)`` from a zero state (D included); per step the log-decay
    since the chunk start ``s_t = cumsum(dt' * A)`` (floored at -60 as ssd floors its
    own); ``decay_c = exp(s_last)`` ``(batch, heads)``; one all_gather of all chunks'
    ``(h0, decay)``; entering state ``h_in_{k+1} = decay_k h_in_k + h0_k`` over global
    chunk order; ``y_c = y0_c + exp(s_t) * (C_t . h_in_c)`` (the state's contribution,
    contracted over ``state``).  Mathematically the full ``ssd``; one ssd per chunk plus
    a ``(batch, T, heads, head_dim, state)``-flop matmul, and one all_gather of
    ``n_local * batch * heads * (head_dim * state + 1)`` floats.

    Backward: exact (autograd, and the exchange's all_gather of the entering states'
    gradients).  Collective: every rank must run backward through its y.  Gradients of A,
    D and dt_bias are this rank's part (sum them over the group).

    One rank: ``ssd(...)[0]`` on the local tensors, which are the whole sequence.
    """
    rank, world = _rank_world(group, layout)
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, chunk_size=chunk_size)
    if world == 1:
        return ssd(x, dt, A, B, C, **kw)[0]
    cd = torch.promote_types(x.dtype, torch.float32)
    xs, dts, Bs, Cs = (local_chunks(t, layout) for t in (x, dt, B, C))
    y0s, h0s, decays, log_decays = [], [], [], []
    for x_c, dt_c, B_c, C_c in zip(xs, dts, Bs, Cs):
        # x in the compute dtype: y0 stays unrounded until the correction is added.
        y0, h0 = ssd(x_c.to(cd), dt_c, A, B_c, C_c, **kw)
        s = (_discretize_dt(dt_c, dt_bias, dt_softplus, dt_limit, cd) * A.to(cd)).cumsum(1)
        s = s.clamp_min(_LOG_DECAY_FLOOR)  # (batch, L, heads)
        y0s.append(y0)
        h0s.append(h0)
        log_decays.append(s)
        decays.append(torch.exp(s[:, -1])[..., None, None])  # (batch, heads, 1, 1)
    entering = _exchange_states(h0s, decays, group, layout)
    batch, _, heads, head_dim = x.shape
    groups, nstate = B.shape[2], B.shape[3]
    ys = []
    for y0, C_c, s, h_in in zip(y0s, Cs, log_decays, entering):
        h_in = h_in.view(batch, groups, heads // groups, head_dim, nstate)
        corr = torch.einsum("blgn,bgrpn->blgrp", C_c.to(cd), h_in).reshape(y0.shape)
        ys.append(torch.addcmul(y0, corr, torch.exp(s)[..., None]))
    return torch.cat(ys, dim=1).to(x.dtype)


# ----------------------------------------------------------------------------- causal conv


def _previous(full: torch.Tensor, width: int) -> torch.Tensor:
    """``(K, batch, w, ...)`` tails of all chunks (w = min(width, chunk length)) ->
    ``(K, batch, width, ...)``: the ``width`` steps before each chunk, zeros before the start."""
    K, batch, w = full.shape[:3]
    zeros = full.new_zeros(batch, width, *full.shape[3:])
    seq = torch.cat([zeros, *full.unbind(0)], dim=1)  # w == chunk length when width exceeds it
    return torch.stack([seq[:, k * w: k * w + width] for k in range(K)])


def previous_tokens(x: torch.Tensor, width: int, *, group=None, layout: str = "contiguous") -> list:
    """For each local chunk, the ``width`` time steps just before it in the full sequence.

    Args:
        x: this rank's shard ``(batch, T_loc, ...)`` (its chunks along time, in layout order).
        width: how many steps (``kernel - 1`` for a causal conv); may exceed the chunk
            length (steps then come from several earlier chunks).
        group: the process group (``None``: the default group); layout: ``"contiguous"``
            or ``"zigzag"``.

    Returns:
        One tensor ``(batch, width, ...)`` per local chunk, in local order (see
        ``local_chunks``): the full sequence's steps ``[start - width, start)`` of that
        chunk, zeros before position 0.  A causal conv per local chunk then equals one
        conv over the full sequence::

            for x_c, prev in zip(local_chunks(x, layout), previous_tokens(x, k - 1, layout=layout)):
                out_c, _ = causal_conv(x_c.transpose(1, 2), weight, bias, prev.transpose(1, 2))

    Forward: one all_gather of every chunk's last ``min(width, chunk length)`` steps.
    Backward: exact; the gradients of all ranks' results are all_gathered and each rank
    adds up those that fall on its own tokens.  Collective: every rank must run backward
    through its result when x requires grad.  Works the same with one rank.
    """
    rank, world = _rank_world(group, layout)
    chunks = local_chunks(x, layout)
    if not isinstance(width, int) or width < 0:
        raise ValueError(f"previous_tokens: width must be an int >= 0; got {width!r}")
    if width == 0:
        return [c[:, :0] for c in chunks]
    length = chunks[0].shape[1]
    w = min(width, length)
    tails = torch.stack([c[:, length - w:] for c in chunks])
    out = _ExchangeMap.apply(tails, partial(_previous, width=width), group, layout)
    return list(out.unbind(0))

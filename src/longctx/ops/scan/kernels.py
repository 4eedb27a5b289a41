"""The selective scan's CPU kernels (numba): forward, and backward by recomputation.

A work item is one batch row b x channels c0:c0+w of group g; ``fwd_kernel`` and
``bwd_kernel`` run the items of ``items`` ``(n, 4)`` (rows ``b, g, c0, w``) in parallel.
An item walks time in chunks of ``CKPT`` steps.  Per chunk, the work per (time, channel)
(bias, softplus, D, the z gate) runs as long vector loops over the item's channels into
chunk buffers ``(CKPT, wp)``; the recurrence runs per sub-block of ``LANES`` channels
(one 512-bit vector), with state arrays laid out ``(sub-block, state, lane)``: a
sub-block's state and A stay in L1, every inner loop is exactly one vector, and y
accumulates in a register across the states.  wp = w rounded up to whole sub-blocks; the
padding lanes hold zeros throughout (dt = 0, u = 0, state 0, A = 0), so for finite inputs
they add exact zeros to the lane sums of dB and dC.

The forward stores the state before every ``CKPT``-th step (when asked); the backward,
per chunk and sub-block, recomputes the states from the chunk's checkpoint and walks
them in reverse.  dB and dC sum over the channels of a group per lane over an item's
sub-blocks, then over the lanes, into one buffer per item: no races, deterministic.

The arguments come in groups (the namedtuples below), which numba passes to a compiled
function as separate arguments: grouping costs nothing at run time.  The groups' arrays
are fp32 and C-contiguous.
"""

from __future__ import annotations

from collections import namedtuple

import numba
import numpy as np

from longctx.ops.numba_math import (
    DECAY_LIMIT,
    IEEE,
    LOG2E,
    ONE,
    ZERO,
    decay,
    exp2,
    fma,
    jit,
    no_overlap,
    sigmoid,
    silu,
    softplus,
    softplus_sigmoid,
    wide_vectors,
)

# The checkpoint interval (steps between stored states, also the chunk of time) and the
# sub-block of channels (one 512-bit vector of fp32).
CKPT = 16
LANES = 16

# The scan's operands: u, delta, z ``(batch, time, channels)`` (z ``(0, 0, 0)`` when
# absent); A ``(channels, state)``; B, C ``(batch, time, groups, state)``; D, bias
# ``(channels,)`` (zeros when absent); h0 ``(batch, channels, state)`` (``(0, 0, 0)`` when
# absent); the flags has_z, delta_softplus (delta' = softplus(delta + bias)), has_h0.
Inputs = namedtuple("Inputs", "u delta A B C D z bias h0 has_z delta_softplus has_h0")
# The forward's results: y ``(batch, time, channels)``, hT ``(batch, channels, state)``,
# ck ``(batch, chunks, state, channels)`` the state before every CKPT-th step, written
# when save_ck.
Outputs = namedtuple("Outputs", "y hT ck save_ck")
# The backward's gradients: dy, dhT in; du, ddelta, dz (like u; dz empty without z), dh0
# ``(batch, channels, state)`` out, and dA ``(batch, channels, state)``, dD, dbias ``(batch,
# channels)`` per batch row (the caller sums).  dB and dC, per work item, are arguments of
# their own.
Grads = namedtuple("Grads", "dy dhT du ddelta dz dA dD dbias dh0")
# What one call works on: batch row b, group g, channels c0:c0+w, steps t0:t0+L.
Rows = namedtuple("Rows", "b g c0 w t0 L")
# A work item's chunk buffers, one row per step: delta', delta' u, y (D u + C h), then for
# the backward sigmoid(delta + bias), dL/d(D u + C h), sigmoid(z), and the parts of du,
# d delta' (gq) and of both (gs).  Either all (CKPT, wp), or the same memory by sub-block
# (CKPT, nsub, LANES).  The forward has only the first three (the others empty).
Chunk = namedtuple("Chunk", "dts dus ys sgs gys sig_z gus gqs gss")


# ---------------------------------------------------------------------------------------
# Buffers and layouts


@jit(**IEEE)
def _zeros64(shape):
    """fp32 zeros of ``shape`` starting on a 64-byte boundary.  numba's own arrays start
    32 bytes into a cache line, so every 512-bit access to them would straddle two lines
    (two L1 accesses, and slow split stores): ~10% of the kernel's time."""
    n = 1
    for d in shape:
        n *= d
    raw = np.zeros(n + LANES, np.float32)
    off = (-(raw.ctypes.data // 4)) % LANES
    return raw[off:off + n].reshape(shape)


@jit(**IEEE)
def _chunk_buffers(full, nsub):
    """A work item's Chunk buffers, zeros: by rows ``(CKPT, nsub * LANES)`` and the same
    memory by sub-block ``(CKPT, nsub, LANES)``.  All nine when full, else the forward's
    three (the other fields empty arrays)."""
    n = 9 if full else 3
    bufs = _zeros64((n, CKPT, nsub * LANES))
    by_sub = bufs.reshape((n, CKPT, nsub, LANES))
    if full:
        return (Chunk(bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5], bufs[6], bufs[7], bufs[8]),
                Chunk(by_sub[0], by_sub[1], by_sub[2], by_sub[3], by_sub[4], by_sub[5], by_sub[6], by_sub[7],
                      by_sub[8]))
    e2, e3 = np.empty((0, 0), np.float32), np.empty((0, 0, 0), np.float32)
    return (Chunk(bufs[0], bufs[1], bufs[2], e2, e2, e2, e2, e2, e2),
            Chunk(by_sub[0], by_sub[1], by_sub[2], e3, e3, e3, e3, e3, e3))


@jit(**IEEE)
def _block_constants(A, c0, w, nsub):
    """A and A2 = A log2 e of the item as (sub-block, state, lane), zero padded, and for
    _steps_in each channel's max |A2| over the states (w,; NaN when not finite)."""
    N = A.shape[1]
    At = _zeros64((nsub, N, LANES))
    A2 = _zeros64((nsub, N, LANES))
    span = np.zeros(w, np.float32)
    for c in range(w):
        s, lane = c // LANES, c % LANES
        for n in range(N):
            At[s, n, lane] = A[c0 + c, n]
            A2[s, n, lane] = A[c0 + c, n] * LOG2E
        top = np.max(np.abs(A2[s, :, lane]))
        span[c] = top if np.isfinite(top) else np.nan
    return At, A2, span


@jit(**IEEE)
def _state_in(x, c0, w, h):
    """h (sub-block, state, lane) = x (channel, state) rows c0:c0+w."""
    for c in range(w):
        for n in range(x.shape[1]):
            h[c // LANES, n, c % LANES] = x[c0 + c, n]


@jit(**IEEE)
def _state_out(h, c0, w, x):
    """x (channel, state) rows c0:c0+w = h (sub-block, state, lane)."""
    for c in range(w):
        for n in range(x.shape[1]):
            x[c0 + c, n] = h[c // LANES, n, c % LANES]


# ---------------------------------------------------------------------------------------
# Forward


@jit(**IEEE)
def _steps_in(x, at, buf, span, bad, fast):
    """The chunk's steps: buf.dts = delta', buf.dus = delta' u, buf.ys = D u (where y
    accumulates); with softplus and a non-empty buf.sgs also sgs = d delta' / d delta =
    sigmoid(delta + bias).

    fast[s] = whether ``decay`` may run for sub-block s in this chunk: every exponent
    delta' A log2 e in [-DECAY_LIMIT, DECAY_LIMIT].  span (w,) = each channel's max
    |A log2 e| (NaN when one is not finite), so |delta'| span <= DECAY_LIMIT bounds them
    all; NaN or infinite delta' or A fail it (then the clamping exp2 runs).  Counted per
    channel into the scratch bad (w,) inside the long vector loop."""
    wide_vectors()
    no_overlap()
    dl, u, delta_softplus = x.delta, x.u, x.delta_softplus
    b, c0, w, t0, L = at.b, at.c0, at.w, at.t0, at.L
    D, bias = x.D[c0:c0 + w], x.bias[c0:c0 + w]
    dts, dus, ys, sgs = buf.dts, buf.dus, buf.ys, buf.sgs
    for c in range(w):
        bad[c] = ZERO
    for j in range(L):
        dr, ur = dl[b, t0 + j, c0:c0 + w], u[b, t0 + j, c0:c0 + w]
        dv, xv, yv = dts[j], dus[j], ys[j]
        if delta_softplus and sgs.shape[0]:
            sg = sgs[j]
            for c in range(w):
                dv[c], sg[c] = softplus_sigmoid(dr[c] + bias[c])
        elif delta_softplus:
            for c in range(w):
                dv[c] = softplus(dr[c] + bias[c])
        else:
            for c in range(w):
                dv[c] = dr[c] + bias[c]
        for c in range(w):
            xv[c] = dv[c] * ur[c]
            yv[c] = D[c] * ur[c]
            bad[c] += ZERO if abs(dv[c]) * span[c] <= DECAY_LIMIT else ONE
    for s in range(fast.shape[0]):
        ok = True
        for c in range(s * LANES, min(w, (s + 1) * LANES)):
            ok = ok and bad[c] == ZERO
        fast[s] = ok


@jit(**IEEE)
def _scan_block(x, at, s, A2, fast, h, sub):
    """The recurrence over the chunk's steps for sub-block s: updates its state h (state,
    lane) in place and accumulates sum_n C h into sub.ys.  A2 = A log2 e (state, lane).
    Inner loops of exactly LANES: one vector each, with y kept in a register across the
    states.  fast: every decay exponent of the chunk is in ``decay``'s range (_steps_in's
    check), else the clamping exp2."""
    wide_vectors()
    no_overlap()
    Bm, Cm = x.B, x.C
    b, g, t0, L = at.b, at.g, at.t0, at.L
    dts, dus, ys = sub.dts, sub.dus, sub.ys
    N = A2.shape[0]
    for j in range(L):
        br, cr = Bm[b, t0 + j, g], Cm[b, t0 + j, g]
        dv, xv, yv = dts[j, s], dus[j, s], ys[j, s]
        for n in range(N):
            bn, cn, hn, an = br[n], cr[n], h[n], A2[n]
            if fast:
                for c in range(LANES):
                    hv = fma(decay(dv[c], an[c]), hn[c], xv[c] * bn)
                    hn[c] = hv
                    yv[c] = fma(cn, hv, yv[c])
            else:
                for c in range(LANES):
                    hv = fma(exp2(dv[c] * an[c]), hn[c], xv[c] * bn)
                    hn[c] = hv
                    yv[c] = fma(cn, hv, yv[c])


@jit(**IEEE)
def _steps_out(x, at, buf, y):
    """y = buf.ys (= D u + C h) gated by silu(z), for the chunk's steps."""
    wide_vectors()
    no_overlap()
    z, has_z = x.z, x.has_z
    b, c0, w, t0, L = at.b, at.c0, at.w, at.t0, at.L
    ys = buf.ys
    for j in range(L):
        yr, yv = y[b, t0 + j, c0:c0 + w], ys[j]
        if has_z:
            zr = z[b, t0 + j, c0:c0 + w]
            for c in range(w):
                yr[c] = yv[c] * silu(zr[c])
        else:
            for c in range(w):
                yr[c] = yv[c]


@jit(**IEEE)
def _fwd_item(x, out, b, g, c0, w):
    """Forward over all time steps of one work item; the state before every CKPT-th step
    goes to out.ck when out.save_ck."""
    T = x.u.shape[1]
    N = x.A.shape[1]
    nsub = (w + LANES - 1) // LANES
    _, A2, span = _block_constants(x.A, c0, w, nsub)
    h = _zeros64((nsub, N, LANES))
    if x.has_h0:
        _state_in(x.h0[b], c0, w, h)
    buf, sub = _chunk_buffers(False, nsub)
    bad = np.empty(w, np.float32)
    fast = np.empty(nsub, np.bool_)
    for k in range((T + CKPT - 1) // CKPT):
        at = Rows(b, g, c0, w, k * CKPT, min(CKPT, T - k * CKPT))
        if out.save_ck:
            _state_out(h, c0, w, out.ck[b, k].T)
        _steps_in(x, at, buf, span, bad, fast)
        for s in range(nsub):
            _scan_block(x, at, s, A2[s], fast[s], h[s], sub)
        _steps_out(x, at, buf, out.y)
    _state_out(h, c0, w, out.hT[b])


@jit(parallel=True, **IEEE)
def fwd_kernel(x, out, items):
    """The forward of every work item: ``x`` Inputs, ``out`` Outputs, ``items`` (n, 4)."""
    for i in numba.prange(items.shape[0]):
        _fwd_item(x, out, items[i, 0], items[i, 1], items[i, 2], items[i, 3])


# ---------------------------------------------------------------------------------------
# Backward


@jit(**IEEE)
def _grads_in(x, gr, at, buf, dDa):
    """The chunk's steps: buf.gys = dL/d(D u + C h) = dy silu(z) (dy without z), sig_z =
    sigmoid(z) (for dz), gus = gys D (D's part of du), gqs = gss = 0; dDa += gys u."""
    wide_vectors()
    no_overlap()
    u, z, has_z, dy = x.u, x.z, x.has_z, gr.dy
    b, c0, w, t0, L = at.b, at.c0, at.w, at.t0, at.L
    D = x.D[c0:c0 + w]
    gys, sig_z, gus, gqs, gss = buf.gys, buf.sig_z, buf.gus, buf.gqs, buf.gss
    for j in range(L):
        dyr, ur = dy[b, t0 + j, c0:c0 + w], u[b, t0 + j, c0:c0 + w]
        gy, gu, gq, gs = gys[j], gus[j], gqs[j], gss[j]
        if has_z:
            zr, sz = z[b, t0 + j, c0:c0 + w], sig_z[j]
            for c in range(w):
                sz[c] = sigmoid(zr[c])
                gy[c] = dyr[c] * (zr[c] * sz[c])
        else:
            for c in range(w):
                gy[c] = dyr[c]
        for c in range(w):
            dDa[c] = fma(gy[c], ur[c], dDa[c])
            gu[c] = gy[c] * D[c]
            gq[c] = ZERO
            gs[c] = ZERO


@jit(inline="always", **IEEE)
def _rescan_lane(e, c, bn, cn, xv, gy, yv, h, hn, dec, pC):
    """Lane c of one state of _rescan_step, with its decay e."""
    dec[c] = e
    hv = fma(e, h[c], xv[c] * bn)
    h[c] = hv
    hn[c] = hv
    yv[c] = fma(cn, hv, yv[c])
    pC[c] = fma(gy[c], hv, pC[c])


@jit(inline="always", **IEEE)
def _rescan_step(A2, fast, br, cr, dv, xv, gy, yv, h, hn, dec, pC):
    """One step of _rescan_block: updates the running state h in place and copies it to
    hn, dec = its decays (state, lane); yv += sum_n C h; pC (state, lane) += gy h, dC's
    partial sums.  The decays as in _scan_block (fast: ``decay``).  The running state
    stays in one place, as in _scan_block: reading it from the previous step's hs row
    instead runs this loop ~1.4x slower."""
    for n in range(A2.shape[0]):
        bn, cn, hv_, hnn, an, decn, pCn = br[n], cr[n], h[n], hn[n], A2[n], dec[n], pC[n]
        if fast:
            for c in range(LANES):
                _rescan_lane(decay(dv[c], an[c]), c, bn, cn, xv, gy, yv, hv_, hnn, decn, pCn)
        else:
            for c in range(LANES):
                _rescan_lane(exp2(dv[c] * an[c]), c, bn, cn, xv, gy, yv, hv_, hnn, decn, pCn)


@jit(**IEEE)
def _rescan_block(x, at, s, A2, fast, h0, h, sub, hs, decs, accC):
    """_scan_block again from the chunk's first state h0, keeping what backward needs:
    hs[j] = state before step t0 + j (j <= L), decs[j] = decay of step t0 + j, both
    (state, lane); sub.ys accumulates sum_n C h (y before the gate) and accC (step, state,
    lane) the lane partial sums of dC = sum gy h (per lane, over sub-blocks).  h (state,
    lane): scratch for the running state."""
    wide_vectors()
    no_overlap()
    Bm, Cm = x.B, x.C
    b, g, t0, L = at.b, at.g, at.t0, at.L
    dts, dus, gys, ys = sub.dts, sub.dus, sub.gys, sub.ys
    N = A2.shape[0]
    for n in range(N):
        for c in range(LANES):
            hs[0, n, c] = h0[n, c]
            h[n, c] = h0[n, c]
    for j in range(L):
        _rescan_step(A2, fast, Bm[b, t0 + j, g], Cm[b, t0 + j, g], dts[j, s], dus[j, s], gys[j, s], ys[j, s], h,
                     hs[j + 1], decs[j], accC[j])


@jit(inline="always", **IEEE)
def _reverse_step(At, dh, dA, br, cr, dv, xv, gy, gq, gs, hp, dec, pB):
    """One step of _reverse_block (see there); hp, dec, pB: (state, lane) of the step."""
    for n in range(At.shape[0]):
        bn, cn, hpn, decn, an, dhn, dAn, pBn = br[n], cr[n], hp[n], dec[n], At[n], dh[n], dA[n], pB[n]
        for c in range(LANES):
            g_ = fma(cn, gy[c], dhn[c])
            gdh = g_ * (decn[c] * hpn[c])
            gq[c] = fma(gdh, an[c], gq[c])
            gs[c] = fma(g_, bn, gs[c])
            dAn[c] = fma(gdh, dv[c], dAn[c])
            dhn[c] = g_ * decn[c]
            pBn[c] = fma(g_, xv[c], pBn[c])


@jit(**IEEE)
def _reverse_block(x, at, s, At, dh, dA, sub, hs, decs, accB):
    """Walk the chunk's steps t0+L-1 .. t0 backwards for sub-block s.

    h_t = dec h_{t-1} + dt B u, y_t += C h_t:  with g = dL/dh_t (this step's part
    C gy plus the part from step t+1 in dh),
      dL/dh_{t-1} = g dec,  dL/dA += g dec h_{t-1} dt,  dL/dB += g dt u,
      dL/d dt += sum_n g dec h_{t-1} A + u sum_n g B,  dL/du += dt sum_n g B
    (dL/dC = gy h_t is summed in _rescan_block).  Per step, sub.gqs gets sum_n g dec h_{t-1} A
    and sub.gss sum_n g B (_grads_out combines them); dh, dA, At: (state, lane) of this
    sub-block; accB (step, state, lane): dB's lane partial sums."""
    wide_vectors()
    no_overlap()
    Bm, Cm = x.B, x.C
    b, g, t0, L = at.b, at.g, at.t0, at.L
    dts, dus, gys, gqs, gss = sub.dts, sub.dus, sub.gys, sub.gqs, sub.gss
    for j in range(L - 1, -1, -1):
        _reverse_step(At, dh, dA, Bm[b, t0 + j, g], Cm[b, t0 + j, g], dts[j, s], dus[j, s], gys[j, s], gqs[j, s],
                      gss[j, s], hs[j], decs[j], accB[j])


@jit(**IEEE)
def _lane_sums(acc, L, out, t0):
    """out[t0 + j, n] = sum of the lanes of acc[j, n] (in lane order)."""
    for j in range(L):
        o = out[t0 + j]
        for n in range(acc.shape[1]):
            a = acc[j, n]
            sm = ZERO
            for c in range(LANES):
                sm += a[c]
            o[n] = sm


@jit(**IEEE)
def _grads_out(x, gr, at, buf, dba):
    """The chunk's steps: write gr.du = gus + dt gss, gr.ddelta = gqs + u gss (through
    softplus: times sgs) and gr.dz (from y before the gate, ys, and sig_z); dba += ddelta."""
    wide_vectors()
    no_overlap()
    u, z, has_z, delta_softplus = x.u, x.z, x.has_z, x.delta_softplus
    dy, du, ddl, dz = gr.dy, gr.du, gr.ddelta, gr.dz
    b, c0, w, t0, L = at.b, at.c0, at.w, at.t0, at.L
    dts, ys, sgs, sig_z, gus, gqs, gss = buf.dts, buf.ys, buf.sgs, buf.sig_z, buf.gus, buf.gqs, buf.gss
    if has_z:
        for j in range(L):
            dyr, zr, dzr, yv, sz = dy[b, t0 + j, c0:c0 + w], z[b, t0 + j, c0:c0 + w], dz[b, t0 + j, c0:c0 + w], \
                ys[j], sig_z[j]
            for c in range(w):
                dzr[c] = dyr[c] * yv[c] * (sz[c] * (ONE + zr[c] * (ONE - sz[c])))
    for j in range(L):
        ur, dur, ddr = u[b, t0 + j, c0:c0 + w], du[b, t0 + j, c0:c0 + w], ddl[b, t0 + j, c0:c0 + w]
        dv, gu, gq, gs = dts[j], gus[j], gqs[j], gss[j]
        for c in range(w):
            gq[c] = fma(ur[c], gs[c], gq[c])
        if delta_softplus:
            sg = sgs[j]
            for c in range(w):
                gq[c] = gq[c] * sg[c]
        for c in range(w):
            dur[c] = fma(dv[c], gs[c], gu[c])
            ddr[c] = gq[c]
            dba[c] += gq[c]


@jit(**IEEE)
def _bwd_item(x, ck, gr, dB, dC, b, g, c0, w):
    """Backward of one work item, chunk by chunk from the last: per sub-block, recompute
    the chunk's states from its checkpoint in ck, then walk them in reverse.  Writes this
    item's slices of gr.dA, dD, dbias, dh0 and its own sums over its channels dB, dC
    ``(time, state)``."""
    T = x.u.shape[1]
    N = x.A.shape[1]
    nsub = (w + LANES - 1) // LANES
    At, A2, span = _block_constants(x.A, c0, w, nsub)
    dh = _zeros64((nsub, N, LANES))  # gradient of the state after the current step
    _state_in(gr.dhT[b], c0, w, dh)
    dAa = _zeros64((nsub, N, LANES))
    h0 = _zeros64((nsub, N, LANES))
    dDa = np.zeros(w, np.float32)
    dba = np.zeros(w, np.float32)
    buf, sub = _chunk_buffers(True, nsub)
    hs = _zeros64((CKPT + 1, N, LANES))
    h = _zeros64((N, LANES))
    decs = _zeros64((CKPT, N, LANES))
    accB = _zeros64((CKPT, N, LANES))
    accC = _zeros64((CKPT, N, LANES))
    bad = np.empty(w, np.float32)
    fast = np.empty(nsub, np.bool_)
    for k in range((T + CKPT - 1) // CKPT - 1, -1, -1):
        at = Rows(b, g, c0, w, k * CKPT, min(CKPT, T - k * CKPT))
        _state_in(ck[b, k].T, c0, w, h0)
        _steps_in(x, at, buf, span, bad, fast)
        _grads_in(x, gr, at, buf, dDa)
        accB[:] = ZERO
        accC[:] = ZERO
        for s in range(nsub):
            _rescan_block(x, at, s, A2[s], fast[s], h0[s], h, sub, hs, decs, accC)
            _reverse_block(x, at, s, At[s], dh[s], dAa[s], sub, hs, decs, accB)
        _grads_out(x, gr, at, buf, dba)
        _lane_sums(accB, at.L, dB, at.t0)
        _lane_sums(accC, at.L, dC, at.t0)
    _state_out(dh, c0, w, gr.dh0[b])
    _state_out(dAa, c0, w, gr.dA[b])
    gr.dD[b, c0:c0 + w] = dDa
    gr.dbias[b, c0:c0 + w] = dba


@jit(parallel=True, **IEEE)
def bwd_kernel(x, ck, gr, dB, dC, items):
    """The backward of every work item: ``x`` Inputs, ``ck`` the forward's Outputs.ck,
    ``gr`` Grads, dB, dC ``(n, time, state)`` each item's sums, ``items`` (n, 4)."""
    for i in numba.prange(items.shape[0]):
        _bwd_item(x, ck, gr, dB[i], dC[i], items[i, 0], items[i, 1], items[i, 2], items[i, 3])

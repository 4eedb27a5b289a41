"""Selective scan (Mamba-1's S6 recurrence), its reference, and the one-token step.

Layout throughout: ``(batch, time, channels)`` for u, delta, z, y; A ``(channels, state)``;
B, C ``(batch, time, state)`` or ``(batch, time, groups, state)``; states
``(batch, channels, state)``.  Channel ``c`` reads group ``c // (channels // groups)``.

The recurrence, per channel ``c`` and state index ``n``::

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t
    y_t    = sum_n C_t[n] h_t[n] + D u_t ;   y_t *= silu(z_t) when z is given

Three implementations, chosen inside ``selective_scan`` from the device:

- CPU: a numba kernel (``parallel=True``, ``fastmath=False``, ``cache=True``).  Each work
  item is one batch row x a block of channels of one group (blocks of up to 512
  channels, at least two items per thread when the shape allows); its state stays in a
  small local array for the whole sequence, so the ``(batch, time, channels, state)``
  tensors of the textbook formulation never exist (the paper's hardware-aware idea).
  Bias, softplus, D and the z gate are fused in.  numba's libm ``exp`` does not
  vectorise (no SVML), so exp is an inlined polynomial that LLVM vectorises (16 lanes
  with AVX-512): the decays use ``exp(dt A) = 2^(dt (A log2 e))`` (degree-6 polynomial,
  1.4 ulp, results below 2^-126 flushed to 0); softplus, sigmoid and silu use a
  Cody-Waite exp (1.4 ulp down to subnormals).  Training stores only the inputs and the
  state every ``_CKPT`` steps; backward recomputes the states of each chunk from its
  checkpoint (the paper's recomputation trick) and walks it in reverse.  Gradients of B
  and C, which sum over the channels of a group, go to one partial buffer per worker
  slot (static item -> slot assignment) summed afterwards: no races, deterministic.
  That channel sum is the one place with a fast-math flag (reassociation only, so it
  vectorises); everything else is plain IEEE fp32 with FMA.
  Kernels compile on the first call (~10 s) and are cached on disk next to this file,
  or, when that directory is read-only, in numba's user cache dir (``NUMBA_CACHE_DIR``
  overrides both; with no writable dir they compile per process, with a warning).
  numba runs ``torch.get_num_threads()`` threads.
- Other devices (numba cannot run there): ``_scan_chunked``, torch ops over chunks of
  ``_CHUNK`` steps with a log-depth (Hillis-Steele) scan inside each chunk, under
  activation checkpointing when gradients are needed, so memory stays linear in time
  without the state dimension.
- ``selective_scan_ref``: a Python loop over time, the plain reference.

``ssm_step`` advances one token in O(1): the generation path.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Checkpoint interval of the CPU kernel's backward (steps between stored states), the
# widest and narrowest channel blocks of its work items, and the torch path's chunk length.
_CKPT = 16
_BLOCK = 512
_MIN_BLOCK = 64
_CHUNK = 64

# numba (with numpy and llvmlite, which it brings) is the one non-torch dependency
# ARCHITECTURE.md allows in ops, for this op's CPU kernel; tests/test_import_rules.py
# names this exception.
try:
    import llvmlite.ir as _ir
    import numba as _nb
    import numba.core.types as _nbtypes
    import numpy as _np
    from numba.extending import intrinsic as _intrinsic

    _NUMBA_ERROR = None
except ImportError as exc:  # reported when the CPU path is used, never silently replaced
    _nb = None
    _NUMBA_ERROR = exc


def _expand_groups(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``(..., groups, state)`` -> ``(..., channels, state)``: each group repeated for its
    channels (one group stays a broadcastable size-1 axis: no copy)."""
    if x.shape[-2] == 1:
        return x
    return x.repeat_interleave(channels // x.shape[-2], dim=-2)


# ---------------------------------------------------------------------------------------
# Validation


def _check(u, delta, A, B, C, D, z, delta_bias, state, *, step: bool, name: str) -> int:
    """Validate shapes, dtypes and devices; return the number of groups of B and C.

    ``step`` selects ssm_step's layout (no time axis)."""
    lead = "(batch, channels)" if step else "(batch, time, channels)"
    want = 2 if step else 3
    for arg, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                   ("delta_bias", delta_bias), ("initial_state" if not step else "state", state)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a torch.Tensor; got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name}: {arg} must have a floating dtype (float32, bfloat16, ...); got {x.dtype}")
        if x.device != u.device:
            raise ValueError(f"{name}: {arg} is on {x.device} but u is on {u.device}; put all inputs on one device")
    if u.dim() != want:
        raise ValueError(f"{name}: u must have shape {lead}; got {tuple(u.shape)}")
    batch, channels = u.shape[0], u.shape[-1]
    if delta.shape != u.shape:
        raise ValueError(f"{name}: delta must have shape {lead} = {tuple(u.shape)} like u; got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"{name}: z must have shape {lead} = {tuple(u.shape)} like u; got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"{name}: A must have shape (channels, state) = ({channels}, state); got {tuple(A.shape)}")
    n = A.shape[1]
    prefix = (batch,) if step else tuple(u.shape[:2])
    pretty = "(batch, state) or (batch, groups, state)" if step else "(batch, time, state) or (batch, time, groups, state)"
    for arg, x in (("B", B), ("C", C)):
        ok = x.dim() in (len(prefix) + 1, len(prefix) + 2) and tuple(x.shape[: len(prefix)]) == prefix and x.shape[-1] == n
        if not ok:
            raise ValueError(
                f"{name}: {arg} must have shape {pretty} with batch, time = {prefix} and state = {n}; got {tuple(x.shape)}"
            )
    if B.shape != C.shape:
        raise ValueError(f"{name}: B and C must have the same shape; got {tuple(B.shape)} and {tuple(C.shape)}")
    groups = B.shape[-2] if B.dim() == len(prefix) + 2 else 1
    if groups < 1 or channels % groups:
        raise ValueError(f"{name}: channels ({channels}) must be a multiple of the groups of B and C ({groups})")
    for arg, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and tuple(x.shape) != (channels,):
            raise ValueError(f"{name}: {arg} must have shape (channels,) = ({channels},); got {tuple(x.shape)}")
    if state is not None and tuple(state.shape) != (batch, channels, n):
        arg = "state" if step else "initial_state"
        raise ValueError(
            f"{name}: {arg} must have shape (batch, channels, state) = ({batch}, {channels}, {n}); got {tuple(state.shape)}"
        )
    return groups


def _as4d(x: torch.Tensor) -> torch.Tensor:
    """B or C as ``(batch, time, groups, state)`` (a view)."""
    return x.unsqueeze(2) if x.dim() == 3 else x


# ---------------------------------------------------------------------------------------
# Reference and one-token step


def _discretize(delta, delta_bias, delta_softplus: bool):
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, initial_state=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: a Python loop over time.  Same arguments and results as
    ``selective_scan``; computes in the widest input dtype and at least fp32 (fp64 inputs
    stay fp64, and so does the returned final state).  ``(batch, channels, state)`` per
    step, nothing of size time x state; for tests and short inputs."""
    groups = _check(u, delta, A, B, C, D, z, delta_bias, initial_state, step=False, name="selective_scan_ref")
    inputs = [x for x in (u, delta, A, B, C, D, z, delta_bias, initial_state) if x is not None]
    dtype = torch.float32
    for x in inputs:
        dtype = torch.promote_types(dtype, x.dtype)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    batch, time, channels = u.shape
    B4, C4 = _as4d(cast(B)), _as4d(cast(C))
    dt = _discretize(cast(delta), cast(delta_bias), delta_softplus)
    A_, u_ = cast(A), cast(u)
    h = cast(initial_state) if initial_state is not None else u_.new_zeros(batch, channels, A.shape[1])
    ys = []
    # unbind, not dt[:, t]: the backward of unbind is one stack, that of indexing a full
    # zero tensor per step (quadratic in time).
    for u_t, dt_t, b_t, c_t in zip(u_.unbind(1), dt.unbind(1), B4.unbind(1), C4.unbind(1)):
        h = torch.exp(dt_t[..., None] * A_) * h + (dt_t * u_t)[..., None] * _expand_groups(b_t, channels)
        ys.append((h * _expand_groups(c_t, channels)).sum(-1))
    y = torch.stack(ys, 1) if ys else u_.new_zeros(batch, 0, channels)
    if D is not None:
        y = y + cast(D) * u_
    if z is not None:
        y = y * F.silu(cast(z))
    del groups
    return y.to(u.dtype), h


def ssm_step(
    u, delta, A, B, C, state, D=None, z=None, delta_bias=None, delta_softplus: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence, O(1) in the sequence length (generation).

    Args:
        u, delta, z: ``(batch, channels)``; A ``(channels, state)``; B, C ``(batch, state)``
            or ``(batch, groups, state)``; state ``(batch, channels, state)``; D,
            delta_bias ``(channels,)``.

    Returns:
        y ``(batch, channels)`` in u's dtype and the new state ``(batch, channels, state)``
        (fp32, or fp64 when an input is fp64).  Running it token by token equals
        ``selective_scan`` with ``initial_state=state``.  Differentiable.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, state, step=True, name="ssm_step")
    dtype = torch.float32
    for x in (u, delta, A, B, C, D, z, delta_bias, state):
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    channels = u.shape[-1]
    B3 = cast(B) if B.dim() == 3 else cast(B).unsqueeze(1)
    C3 = cast(C) if C.dim() == 3 else cast(C).unsqueeze(1)
    u_ = cast(u)
    dt = _discretize(cast(delta), cast(delta_bias), delta_softplus)
    new = torch.exp(dt[..., None] * cast(A)) * cast(state) + (dt * u_)[..., None] * _expand_groups(B3, channels)
    y = (new * _expand_groups(C3, channels)).sum(-1)
    if D is not None:
        y = y + cast(D) * u_
    if z is not None:
        y = y * F.silu(cast(z))
    return y.to(u.dtype), new


# ---------------------------------------------------------------------------------------
# Torch path for devices numba cannot run on


def _chunk(h, u, dt, A, B4, C4):
    """One chunk of the scan in torch ops: ``(batch, L, channels)`` inputs, state ``h`` before
    the chunk; returns (y without D/z ``(batch, L, channels)``, state after the chunk).

    Inside the chunk, a Hillis-Steele scan over the pairs (decay, input): log2(L) steps of
    elementwise products on ``(batch, L, channels, state)``; decays only multiply, so it
    is as stable as the sequential loop."""
    channels = u.shape[-1]
    decay = torch.exp(dt[..., None] * A)
    x = (dt * u)[..., None] * _expand_groups(B4, channels)
    step = 1
    while step < decay.shape[1]:
        x = torch.cat([x[:, :step], x[:, step:] + decay[:, step:] * x[:, :-step]], 1)
        decay = torch.cat([decay[:, :step], decay[:, step:] * decay[:, :-step]], 1)
        step *= 2
    hs = x + decay * h[:, None]
    return (hs * _expand_groups(C4, channels)).sum(-1), hs[:, -1]


def _scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, chunk=_CHUNK):
    """selective_scan in torch ops over chunks of ``chunk`` steps (any device), fp32.

    With gradients each chunk runs under activation checkpointing: saved are the inputs
    and one state per chunk; the chunk's ``(batch, chunk, channels, state)`` tensors are
    rebuilt in backward."""
    batch, time, channels = u.shape
    f32 = lambda x: None if x is None else x.float()  # noqa: E731
    u_, A_, B4, C4 = f32(u), f32(A), _as4d(f32(B)), _as4d(f32(C))
    dt = _discretize(f32(delta), f32(delta_bias), delta_softplus)
    h = f32(initial_state) if initial_state is not None else u_.new_zeros(batch, channels, A.shape[1])
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    ys = []
    for t0 in range(0, time, chunk):
        args = (h, u_[:, t0:t0 + chunk], dt[:, t0:t0 + chunk], A_, B4[:, t0:t0 + chunk], C4[:, t0:t0 + chunk])
        y, h = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        ys.append(y)
    y = torch.cat(ys, 1) if ys else u_.new_zeros(batch, 0, channels)
    if D is not None:
        y = y + f32(D) * u_
    if z is not None:
        y = y * F.silu(f32(z))
    return y.to(u.dtype), h


# ---------------------------------------------------------------------------------------
# numba kernels (CPU)

if _nb is not None:
    _f32 = _np.float32
    _LOG2E = _f32(1.4426950408889634)
    _LN2_HI = _f32(-0.693359375)  # negated: used as fma(k, -ln2, x)
    _LN2_LO = _f32(2.12194440e-4)
    _E0, _E1, _E2 = _f32(1.9875691500e-4), _f32(1.3981999507e-3), _f32(8.3334519073e-3)
    _E3, _E4, _E5 = _f32(4.1665795894e-2), _f32(1.6666665459e-1), _f32(5.0000001201e-1)
    _X_LO, _X_HI = _f32(-104.0), _f32(89.0)  # exp is 0 below and inf above (exactly rounded)
    _MAGIC = _f32(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds to an integer
    _ZERO, _ONE, _TWO = _f32(0.0), _f32(1.0), _f32(2.0)
    # 2^f on [-1/2, 1/2]: degree-6 interpolant at Chebyshev nodes, max relative error 1.4 ulp.
    _Q = (_f32(1.0), _f32(0.6931471824645996), _f32(0.24022650718688965), _f32(0.05550327152013779),
          _f32(0.009618056938052177), _f32(0.0013400427997112274), _f32(0.00015461444854736328))
    _Y_LO, _Y_HI = _f32(-127.0), _f32(128.0)
    # log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3] for e in [0, 1]: 2 s sum s^2k / (2k+1)
    _L = tuple(_f32(1.0 / (2 * k + 1)) for k in range(8))
    _I127, _I23, _I1 = _np.int32(127), _np.int32(23), _np.int32(1)

    @_intrinsic
    def _fma(typingctx, a, b, c):
        """IEEE fused multiply-add on float32 (one rounding; vectorises)."""
        sig = _nbtypes.float32(_nbtypes.float32, _nbtypes.float32, _nbtypes.float32)

        def codegen(context, builder, signature, args):
            f = _ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [f], _ir.FunctionType(f, [f, f, f]))
            return builder.call(fn, args)

        return sig, codegen

    @_intrinsic
    def _bits_to_f32(typingctx, x):
        """Reinterpret int32 bits as float32."""
        sig = _nbtypes.float32(_nbtypes.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.FloatType())

        return sig, codegen

    def _jit(**options):
        """numba.njit with the on-disk cache; if numba finds no writable cache directory
        (package read-only and no user cache dir), compile in memory and say so once."""

        def decorate(fn):
            try:
                return _nb.njit(cache=True, **options)(fn)
            except RuntimeError as exc:  # "cannot cache function ...: no locator available"
                if not _NO_CACHE_WARNED:
                    _NO_CACHE_WARNED.append(True)
                    warnings.warn(f"longctx.ops.scan: {exc}; numba kernels will compile in every process "
                                  "(~10 s). Set NUMBA_CACHE_DIR to a writable directory.", stacklevel=2)
                return _nb.njit(cache=False, **options)(fn)

        return decorate

    _NO_CACHE_WARNED: list = []
    _JIT = dict(fastmath=False, error_model="numpy")  # numpy errors: no zero-division branch

    @_jit(inline="always", **_JIT)
    def _exp(x):
        """float32 exp, max relative error 1.4 ulp (normal and subnormal results).

        x = k ln2 + r, |r| <= ln2 / 2 (two-part ln2); e^r by Cephes' expf polynomial;
        2^k applied as two factors 2^(k//2) 2^(k - k//2) so results down to the smallest
        subnormal round correctly and 2^128 overflows to inf."""
        xc = _X_LO if x < _X_LO else x  # comparisons written so that NaN passes through
        xc = _X_HI if xc > _X_HI else xc
        k = (xc * _LOG2E + _MAGIC) - _MAGIC
        r = _fma(k, _LN2_HI, xc)
        r = _fma(k, _LN2_LO, r)
        p = _fma(_E0, r, _E1)
        p = _fma(p, r, _E2)
        p = _fma(p, r, _E3)
        p = _fma(p, r, _E4)
        p = _fma(p, r, _E5)
        p = _fma(p, r * r, r) + _ONE
        ki = _np.int32(k)
        k1 = ki >> _I1
        s1 = _bits_to_f32((k1 + _I127) << _I23)
        s2 = _bits_to_f32((ki - k1 + _I127) << _I23)
        return (p * s1) * s2

    @_jit(inline="always", **_JIT)
    def _exp2(y):
        """float32 2^y for the decays (the hot loop): 12 vector operations.

        Max relative error 1.4 ulp; results below 2^-126 flush to 0 and above 2^127.5 are
        inf.  The decays use exp(dt A) = 2^(dt (A log2 e)): the extra rounding of
        A log2 e is of the same order as that of the fp32 product dt A itself."""
        yc = _Y_LO if y < _Y_LO else y  # k = -127 gives the scale 0: a flush to zero
        yc = _Y_HI if yc > _Y_HI else yc  # k = 128 gives the scale inf
        k = _np.rint(yc)
        f = yc - k  # exact
        p = _fma(_Q[6], f, _Q[5])
        p = _fma(p, f, _Q[4])
        p = _fma(p, f, _Q[3])
        p = _fma(p, f, _Q[2])
        p = _fma(p, f, _Q[1])
        p = _fma(p, f, _Q[0])
        return p * _bits_to_f32((_np.int32(k) + _I127) << _I23)

    @_jit(inline="always", **_JIT)
    def _sigmoid(x):
        return _ONE / (_ONE + _exp(-x))

    @_jit(inline="always", **_JIT)
    def _softplus(x):
        """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), log1p by the atanh series (~2 ulp)."""
        e = _exp(-abs(x))
        s = e / (_TWO + e)
        s2 = s * s
        p = _fma(_L[7], s2, _L[6])
        p = _fma(p, s2, _L[5])
        p = _fma(p, s2, _L[4])
        p = _fma(p, s2, _L[3])
        p = _fma(p, s2, _L[2])
        p = _fma(p, s2, _L[1])
        p = _fma(p, s2, _L[0])
        return max(x, _ZERO) + _TWO * s * p

    @_jit(**_JIT)
    def _prepare_step(dr, ur, bias, Dv, softplus, w, dv, du, yv, sg):
        """One time step of a block: dv = delta', du = delta' u, yv = D u; with softplus and
        a non-empty sg also sg = d delta' / d delta = sigmoid(delta + bias)."""
        if softplus:
            for c in range(w):
                dv[c] = _softplus(dr[c] + bias[c])
            if sg.shape[0]:
                for c in range(w):
                    sg[c] = _sigmoid(dr[c] + bias[c])
        else:
            for c in range(w):
                dv[c] = dr[c] + bias[c]
        for c in range(w):
            du[c] = dv[c] * ur[c]
            yv[c] = Dv[c] * ur[c]

    @_jit(**_JIT)
    def _load_block(A, D, bias, c0, w):
        N = A.shape[1]
        At = _np.empty((N, w), _np.float32)
        A2 = _np.empty((N, w), _np.float32)
        for n in range(N):
            for c in range(w):
                At[n, c] = A[c0 + c, n]
                A2[n, c] = A[c0 + c, n] * _LOG2E
        return At, A2, D[c0:c0 + w], bias[c0:c0 + w]

    @_jit(**_JIT)
    def _fwd_item(u, dl, A, Bm, Cm, D, z, bias, h0, y, hT, ck, b, g, c0, w, K, has_z, softplus, has_h0, save_ck):
        """Forward over all time steps of one (batch row b, channels c0:c0+w of group g)."""
        T = u.shape[1]
        N = A.shape[1]
        At, A2, Dv, bv = _load_block(A, D, bias, c0, w)
        h = _np.zeros((N, w), _np.float32)
        if has_h0:
            for n in range(N):
                for c in range(w):
                    h[n, c] = h0[b, c0 + c, n]
        dv = _np.empty(w, _np.float32)
        du = _np.empty(w, _np.float32)
        yv = _np.empty(w, _np.float32)
        no_sg = _np.empty(0, _np.float32)
        for t in range(T):
            if save_ck and t % K == 0:
                ckr = ck[b, t // K]
                for n in range(N):
                    ckn = ckr[n, c0:c0 + w]
                    hn = h[n]
                    for c in range(w):
                        ckn[c] = hn[c]
            _prepare_step(dl[b, t, c0:c0 + w], u[b, t, c0:c0 + w], bv, Dv, softplus, w, dv, du, yv, no_sg)
            br, cr = Bm[b, t, g], Cm[b, t, g]
            for n in range(N):
                bn, cn = br[n], cr[n]
                hn, an = h[n], A2[n]
                for c in range(w):
                    hv = _fma(_exp2(dv[c] * an[c]), hn[c], du[c] * bn)
                    hn[c] = hv
                    yv[c] = _fma(cn, hv, yv[c])
            yr = y[b, t, c0:c0 + w]
            if has_z:
                zr = z[b, t, c0:c0 + w]
                for c in range(w):
                    yr[c] = yv[c] * (zr[c] * _sigmoid(zr[c]))
            else:
                for c in range(w):
                    yr[c] = yv[c]
        for n in range(N):
            for c in range(w):
                hT[b, c0 + c, n] = h[n, c]

    @_jit(parallel=True, **_JIT)
    def _fwd_kernel(u, dl, A, Bm, Cm, D, z, bias, h0, y, hT, ck, items, K, has_z, softplus, has_h0, save_ck):
        for i in _nb.prange(items.shape[0]):
            _fwd_item(u, dl, A, Bm, Cm, D, z, bias, h0, y, hT, ck, items[i, 0], items[i, 1], items[i, 2],
                      items[i, 3], K, has_z, softplus, has_h0, save_ck)

    @_jit(fastmath={"reassoc"}, error_model="numpy")
    def _dot_rows(X, v, w, out):
        """out[n] += sum_c X[n, c] v[c].  The one function compiled with a fast-math flag:
        only reassociation, so that LLVM vectorises the sum (5x); products and sums stay
        IEEE fp32, added in a different (fixed) order."""
        for n in range(X.shape[0]):
            row = X[n]
            s = _ZERO
            for c in range(w):
                s += row[c] * v[c]
            out[n] += s

    @_jit(**_JIT)
    def _bwd_item(u, dl, A, Bm, Cm, D, z, bias, ck, dy, dhT, du, ddl, dz, dA, dD, dbias, dB, dC, dh0,
                  b, g, c0, w, K, has_z, softplus):
        """Backward of one work item.  Per chunk of K steps (last chunk first): recompute the
        states from the chunk's checkpoint into hs, then walk the chunk in reverse.
        dA, dD, dbias, dh0 are this item's own slices; dB, dC this slot's partial buffer."""
        T = u.shape[1]
        N = A.shape[1]
        At, A2, Dv, bv = _load_block(A, D, bias, c0, w)
        dh = _np.empty((N, w), _np.float32)  # gradient of the state after the current step
        for n in range(N):
            for c in range(w):
                dh[n, c] = dhT[b, c0 + c, n]
        dAa = _np.zeros((N, w), _np.float32)
        hs = _np.empty((K + 1, N, w), _np.float32)  # hs[j] = state before step t0 + j
        decs = _np.empty((K, N, w), _np.float32)
        dts = _np.empty((K, w), _np.float32)
        dus = _np.empty((K, w), _np.float32)
        sgs = _np.empty((K, w), _np.float32)
        ypre = _np.empty((K, w), _np.float32)
        gh = _np.empty((N, w), _np.float32)
        gy = _np.empty(w, _np.float32)
        gu = _np.empty(w, _np.float32)
        gdt = _np.empty(w, _np.float32)
        dDa = _np.zeros(w, _np.float32)
        dba = _np.zeros(w, _np.float32)
        nck = (T + K - 1) // K
        for k in range(nck - 1, -1, -1):
            t0 = k * K
            L = min(K, T - t0)
            ckr = ck[b, k]
            for n in range(N):
                ckn = ckr[n, c0:c0 + w]
                hn = hs[0, n]
                for c in range(w):
                    hn[c] = ckn[c]
            for j in range(L):
                t = t0 + j
                dv, duj, yv = dts[j], dus[j], ypre[j]
                _prepare_step(dl[b, t, c0:c0 + w], u[b, t, c0:c0 + w], bv, Dv, softplus, w, dv, duj, yv, sgs[j])
                br, cr = Bm[b, t, g], Cm[b, t, g]
                for n in range(N):
                    bn, cn = br[n], cr[n]
                    hp, hn, an, dec = hs[j, n], hs[j + 1, n], A2[n], decs[j, n]
                    for c in range(w):
                        e = _exp2(dv[c] * an[c])
                        dec[c] = e
                        hv = _fma(e, hp[c], duj[c] * bn)
                        hn[c] = hv
                        yv[c] = _fma(cn, hv, yv[c])
            for j in range(L - 1, -1, -1):
                t = t0 + j
                ur = u[b, t, c0:c0 + w]
                dyr = dy[b, t, c0:c0 + w]
                dv, duj = dts[j], dus[j]
                if has_z:
                    zr = z[b, t, c0:c0 + w]
                    dzr = dz[b, t, c0:c0 + w]
                    yv = ypre[j]
                    for c in range(w):
                        zc = zr[c]
                        s = _sigmoid(zc)
                        dzr[c] = dyr[c] * yv[c] * (s * (_ONE + zc * (_ONE - s)))
                        gy[c] = dyr[c] * (zc * s)
                else:
                    for c in range(w):
                        gy[c] = dyr[c]
                for c in range(w):
                    dDa[c] = _fma(gy[c], ur[c], dDa[c])
                    gu[c] = gy[c] * Dv[c]
                    gdt[c] = _ZERO
                br, cr = Bm[b, t, g], Cm[b, t, g]
                # h_t = dec h_{t-1} + dt B u, y_t += C h_t:  with g = dL/dh_t (this step's part
                # C gy plus the part from step t+1 in dh),
                #   dL/d dt += g (dec h_{t-1} A + B u),  dL/dA += g dec h_{t-1} dt,
                #   dL/du += g dt B,  dL/dB += g dt u,  dL/dC += gy h_t,  dL/dh_{t-1} = g dec.
                for n in range(N):
                    bn, cn = br[n], cr[n]
                    hp, an, dec = hs[j, n], At[n], decs[j, n]
                    dhn, dAn, ghn = dh[n], dAa[n], gh[n]
                    for c in range(w):
                        g_ = _fma(cn, gy[c], dhn[c])
                        ghn[c] = g_
                        dhp = dec[c] * hp[c]
                        gdt[c] = _fma(g_, _fma(dhp, an[c], bn * ur[c]), gdt[c])
                        gd = g_ * dv[c]
                        dAn[c] = _fma(gd, dhp, dAn[c])
                        gu[c] = _fma(gd, bn, gu[c])
                        dhn[c] = g_ * dec[c]
                _dot_rows(gh, duj, w, dB[b, t, g])
                _dot_rows(hs[j + 1], gy, w, dC[b, t, g])
                dur, ddr = du[b, t, c0:c0 + w], ddl[b, t, c0:c0 + w]
                if softplus:
                    sg = sgs[j]
                    for c in range(w):
                        gdt[c] = gdt[c] * sg[c]
                for c in range(w):
                    dur[c] = gu[c]
                    ddr[c] = gdt[c]
                    dba[c] += gdt[c]
        for n in range(N):
            for c in range(w):
                dh0[b, c0 + c, n] = dh[n, c]
                dA[b, c0 + c, n] = dAa[n, c]
        for c in range(w):
            dD[b, c0 + c] = dDa[c]
            dbias[b, c0 + c] = dba[c]

    @_jit(parallel=True, **_JIT)
    def _bwd_kernel(u, dl, A, Bm, Cm, D, z, bias, ck, dy, dhT, du, ddl, dz, dA, dD, dbias, dB, dC, dh0,
                    items, K, has_z, softplus):
        slots = dB.shape[0]
        for s in _nb.prange(slots):
            for i in range(s, items.shape[0], slots):
                _bwd_item(u, dl, A, Bm, Cm, D, z, bias, ck, dy, dhT, du, ddl, dz, dA, dD, dbias, dB[s], dC[s], dh0,
                          items[i, 0], items[i, 1], items[i, 2], items[i, 3], K, has_z, softplus)


def _require_numba() -> None:
    if _nb is None:
        raise ImportError(
            "selective_scan on CPU runs a numba kernel, and numba failed to import "
            f"({_NUMBA_ERROR}); install it with `pip install 'numba>=0.59'`, "
            "or call selective_scan_ref (slow) instead"
        ) from _NUMBA_ERROR


def _items(batch: int, channels: int, groups: int, threads: int):
    """Work items ``(b, g, c0, width)``: blocks of channels inside one group.

    Wide blocks run faster (longer vector loops, ~1.5x from 128 to 384 channels) but
    there must be enough items for the threads: at least two per thread when the
    channels allow, widths a multiple of 16 and at most ``_BLOCK``."""
    per = channels // groups
    blocks = max(1, -(-2 * threads // (batch * groups)))
    width = min(_BLOCK, max(_MIN_BLOCK, -(-per // blocks)))
    width = min(per, -(-width // 16) * 16)
    rows = [(b, g, c0, min(width, g * per + per - c0))
            for b in range(batch) for g in range(groups) for c0 in range(g * per, (g + 1) * per, width)]
    return _np.asarray(rows, dtype=_np.int64).reshape(-1, 4)


def _np32(x: torch.Tensor | None, ndim: int):
    """fp32 C-contiguous numpy view (a copy only when needed); an empty array for None."""
    if x is None:
        return _np.zeros((0,) * ndim, _np.float32)
    return x.detach().to(torch.float32).contiguous().numpy()


def _vec(x: torch.Tensor | None, channels: int):
    """D / delta_bias as an fp32 ``(channels,)`` array (zeros when absent: adds 0, gradient unused)."""
    return _np.zeros(channels, _np.float32) if x is None else _np32(x, 1)


class _Threads:
    """Run numba with torch's thread count (capped at numba's pool size)."""

    def __enter__(self):
        self.old = _nb.get_num_threads()
        _nb.set_num_threads(max(1, min(torch.get_num_threads(), _nb.config.NUMBA_NUM_THREADS)))
        return _nb.get_num_threads()

    def __exit__(self, *exc):
        _nb.set_num_threads(self.old)


def _numba_forward(u, delta, A, B4, C4, D, z, delta_bias, softplus: bool, initial_state, save_ck: bool):
    """Run the forward kernel; returns y (fp32), final state, checkpoints (or None)."""
    batch, time, channels = u.shape
    n = A.shape[1]
    y = torch.empty(batch, time, channels, dtype=torch.float32)
    hT = torch.empty(batch, channels, n, dtype=torch.float32)
    nck = (time + _CKPT - 1) // _CKPT
    ck = torch.empty((batch, nck, n, channels) if save_ck else (0, 0, 0, 0), dtype=torch.float32)
    with _Threads() as threads:
        items = _items(batch, channels, B4.shape[2], threads)
        _fwd_kernel(_np32(u, 3), _np32(delta, 3), _np32(A, 2), _np32(B4, 4), _np32(C4, 4), _vec(D, channels),
                    _np32(z, 3), _vec(delta_bias, channels), _np32(initial_state, 3), y.numpy(), hT.numpy(),
                    ck.numpy(), items, _CKPT, z is not None, bool(softplus), initial_state is not None, save_ck)
    return y, hT, (ck if save_ck else None)


class _NumbaScan(torch.autograd.Function):
    """The CPU kernel with its recomputing backward.  Saves the inputs and a state every
    ``_CKPT`` steps ``(batch, time / _CKPT, state, channels)``: nothing of size
    time x channels x state."""

    @staticmethod
    def forward(ctx, u, delta, A, B4, C4, D, z, delta_bias, initial_state, softplus: bool):
        y, hT, ck = _numba_forward(u, delta, A, B4, C4, D, z, delta_bias, softplus, initial_state, True)
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, initial_state, ck)
        ctx.softplus = softplus
        return y.to(u.dtype), hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, delta, A, B4, C4, D, z, delta_bias, initial_state, ck = ctx.saved_tensors
        batch, time, channels = u.shape
        groups, n = B4.shape[2], A.shape[1]
        f32 = torch.float32
        dy = torch.zeros(u.shape, dtype=f32) if dy is None else dy
        dhT = torch.zeros(batch, channels, n, dtype=f32) if dhT is None else dhT
        with _Threads() as threads:
            items = _items(batch, channels, groups, threads)
            slots = max(1, min(threads, items.shape[0]))
            du, ddelta = torch.empty(u.shape, dtype=f32), torch.empty(u.shape, dtype=f32)
            dz = torch.empty(u.shape if z is not None else (0, 0, 0), dtype=f32)
            dA = torch.empty(batch, channels, n, dtype=f32)
            dD, dbias = torch.empty(batch, channels, dtype=f32), torch.empty(batch, channels, dtype=f32)
            dB = torch.zeros(slots, batch, time, groups, n, dtype=f32)
            dC = torch.zeros(slots, batch, time, groups, n, dtype=f32)
            dh0 = torch.empty(batch, channels, n, dtype=f32)
            _bwd_kernel(_np32(u, 3), _np32(delta, 3), _np32(A, 2), _np32(B4, 4), _np32(C4, 4), _vec(D, channels),
                        _np32(z, 3), _vec(delta_bias, channels), ck.numpy(), _np32(dy, 3), _np32(dhT, 3),
                        du.numpy(), ddelta.numpy(), dz.numpy(), dA.numpy(), dD.numpy(), dbias.numpy(), dB.numpy(),
                        dC.numpy(), dh0.numpy(), items, _CKPT, z is not None, ctx.softplus)
        need = ctx.needs_input_grad
        out = lambda g, x, i: g.to(x.dtype) if need[i] else None  # noqa: E731
        return (
            out(du, u, 0), out(ddelta, delta, 1), out(dA.sum(0), A, 2), out(dB.sum(0), B4, 3),
            out(dC.sum(0), C4, 4), None if D is None else out(dD.sum(0), D, 5),
            None if z is None else out(dz, z, 6), None if delta_bias is None else out(dbias.sum(0), delta_bias, 7),
            None if initial_state is None else out(dh0, initial_state, 8), None,
        )


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan over a whole sequence, with a start and an end state.

    Args:
        u: ``(batch, time, channels)`` input.
        delta: ``(batch, time, channels)`` step sizes (before bias/softplus).
        A: ``(channels, state)`` (negative for a decaying state: ``-exp(A_log)``).
        B, C: ``(batch, time, state)``, or ``(batch, time, groups, state)`` with channels in
            ``groups`` equal contiguous blocks.
        D: optional ``(channels,)`` skip weight; z: optional ``(batch, time, channels)`` gate,
            ``y *= silu(z)``; delta_bias: optional ``(channels,)`` added to delta;
            delta_softplus: apply softplus to delta (after the bias).
        initial_state: optional ``(batch, channels, state)``, zeros by default.

    Returns:
        y ``(batch, time, channels)`` in u's dtype and final_state ``(batch, channels, state)``
        in fp32.  Computed in fp32 whatever the input dtypes.  Differentiable in every tensor
        argument, initial_state included, and through final_state, so scanning a sequence
        in pieces (final_state -> initial_state) equals one scan, values and gradients.

    Path: on CPU the numba kernel (memory: inputs plus a state every _CKPT = 16 steps, nothing of
    size time x channels x state); on other devices the chunked torch scan.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, step=False, name="selective_scan")
    if u.device.type != "cpu":
        return _scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    _require_numba()
    B4, C4 = _as4d(B), _as4d(C)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _NumbaScan.apply(u, delta, A, B4, C4, D, z, delta_bias, initial_state, bool(delta_softplus))
    y, hT, _ = _numba_forward(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, initial_state, False)
    return y.to(u.dtype), hT

"""Selective scan (Mamba-1's S6 recurrence), its reference, and the one-token step.

Layout throughout: ``(batch, time, channels)`` for u, delta, z, y; A ``(channels, state)``;
B, C ``(batch, time, state)`` or ``(batch, time, groups, state)``; states
``(batch, channels, state)``.  Channel ``c`` reads group ``c // (channels // groups)``.

The recurrence, per channel ``c`` and state index ``n``::

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t
    y_t    = sum_n C_t[n] h_t[n] + D u_t ;   y_t *= silu(z_t) when z is given

Three implementations, chosen inside ``selective_scan`` from the device:

- CPU: a numba kernel (``parallel=True``, ``fastmath=False``, ``cache=True``).  A work
  item is one batch row x a block of channels of one group (up to 1024 channels, as wide
  as still gives every thread an item; threads take them one at a time).  An item walks
  time in chunks of ``_CKPT`` steps.  Per chunk, the work per (time, channel) (bias,
  softplus, D, the z gate) runs as long vector loops over the item's channels into small
  chunk buffers, and the recurrence runs per sub-block of ``_LANES`` = 16 channels (one
  512-bit vector): the sub-block's state and A (state x 16 each) stay in L1, every inner
  loop is exactly one vector, and y accumulates in a register across the states.  The
  ``(batch, time, channels, state)`` tensors of the textbook formulation never exist (the
  paper's hardware-aware idea).  Two LLVM function attributes make the loops vectorise
  well: 512-bit vectors (LLVM prefers 256 bits on AVX-512 CPUs) and ``noalias`` on the
  array arguments (no run-time overlap checks; accumulators stay in registers).  numba's
  libm ``exp`` does not vectorise (no SVML), so exp is an inlined polynomial that LLVM
  vectorises: the decays use ``exp(dt A) = 2^(dt (A log2 e))`` (degree-6 polynomial, 1.4
  ulp).  Where a chunk's exponents all lie within +-125 (checked per chunk and sub-block
  from each channel's largest |A|, so almost always), ``_decay`` takes 11 vector
  operations: two fmas give the integer and fractional parts from the exact product, no
  clamping.  Elsewhere ``_exp2`` clamps (results below 2^-126 flushed to 0, which also
  keeps slow subnormals out of the recurrence; NaN and inf pass through).  softplus,
  sigmoid and silu use a Cody-Waite exp (1.4 ulp down to subnormals), and softplus's log1p
  a polynomial, not a division (1.45 ulp).  The kernel's buffers start on 64-byte
  boundaries (numba's start 32 bytes in: split accesses).  Training stores only the
  inputs and the state every ``_CKPT`` steps;
  backward, per chunk and sub-block, recomputes the states from the chunk's checkpoint
  (the paper's recomputation trick) and walks them in reverse.  Gradients of B and C sum
  over the channels of a group: per lane over an item's sub-blocks, then over the 16
  lanes, into one buffer per item, and the items' buffers are added in item order
  afterwards: no races, deterministic.  No fast-math anywhere: plain IEEE fp32 with FMA.
  Kernels compile on the first call (~15 s) and are cached on disk next to this file,
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

# The CPU kernel's checkpoint interval (steps between stored states, also its chunk of
# time), its sub-block of channels (one 512-bit vector of fp32), the widest and narrowest
# channel blocks of its work items; the torch path's chunk length.
_CKPT = 16
_LANES = 16
_BLOCK = 1024
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
    _MAGIC_127 = _f32(12582912.0 + 127.0)  # the same, with the exponent bias in its low bits
    _ZERO, _ONE = _f32(0.0), _f32(1.0)
    # 2^f on [-1/2, 1/2]: degree-6 interpolant at Chebyshev nodes, max relative error 1.4 ulp.
    _Q = (_f32(1.0), _f32(0.6931471824645996), _f32(0.24022650718688965), _f32(0.05550327152013779),
          _f32(0.009618056938052177), _f32(0.0013400427997112274), _f32(0.00015461444854736328))
    _Y_LO, _Y_HI = _f32(-127.0), _f32(128.0)
    _FAST_LIM = _f32(125.0)  # |exponent| for _decay; 125, not 126: the check rounds d a2 first
    # log1p(e) / e on [0, 1]: degree-10 interpolant at Chebyshev nodes (fp64 fit, rounded to
    # fp32); e times it is log1p(e) within 1.45 ulp over [0, 1], with no division.
    _LP = (_f32(1.0), _f32(-0.4999997913837433), _f32(0.33332496881484985), _f32(-0.24986496567726135),
           _f32(0.19885820150375366), _f32(-0.16087622940540314), _f32(0.12377995997667313),
           _f32(-0.08188041299581528), _f32(0.041006576269865036), _f32(-0.013187826611101627),
           _f32(0.001986696617677808))
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

    @_intrinsic
    def _f32_to_bits(typingctx, x):
        """Reinterpret float32 as int32 bits."""
        sig = _nbtypes.int32(_nbtypes.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.IntType(32))

        return sig, codegen

    @_intrinsic
    def _wide_vectors(typingctx):
        """Let LLVM vectorise the calling function's loops with 512-bit registers.

        On AVX-512 CPUs LLVM's x86 tuning prefers 256-bit vectors (prefer-256-bit, against
        the clock drop of older parts), so numba's loops get 8 lanes; the function attribute
        ``"prefer-vector-width"="512"`` lifts that for this function only (16 lanes: the
        recurrence runs ~1.3x faster).  Without AVX-512 it changes nothing.  llvmlite's
        attribute set only takes names it knows, hence ``set.add`` (emitted as is)."""
        sig = _nbtypes.none()

        def codegen(context, builder, signature, args):
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            return context.get_dummy_value()

        return sig, codegen

    @_intrinsic
    def _no_overlap(typingctx):
        """Promise LLVM that the calling function's float32 arrays do not overlap (``noalias``
        on their data pointers), which every caller guarantees: distinct arrays, or disjoint
        rows of one.  Without it the vectoriser must check every pair of arrays at run time
        before each inner loop (too many pairs: it gives up) and cannot keep an accumulator
        such as y in a register across the loop over states."""
        sig = _nbtypes.none()

        def codegen(context, builder, signature, args):
            for arg in builder.function.args:
                if isinstance(arg.type, _ir.PointerType) and arg.type.pointee == _ir.FloatType():
                    arg.add_attribute("noalias")
            return context.get_dummy_value()

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
                                  "(~15 s). Set NUMBA_CACHE_DIR to a writable directory.", stacklevel=2)
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
    def _horner(c, x):
        """c[0] + c[1] x + ... + c[-1] x^(len(c) - 1), one fma per coefficient (a loop of
        constant length over a constant tuple: LLVM unrolls it into the same fma chain)."""
        p = c[len(c) - 1]
        for k in range(len(c) - 2, -1, -1):
            p = _fma(p, x, c[k])
        return p

    @_jit(inline="always", **_JIT)
    def _scaled_pow2(f, kb):
        """2^f 2^k for f in [-1/2, 1/2] and kb = k + _MAGIC_127 (k + 127 in its low bits):
        the degree-6 polynomial, then the scale made by one shift of kb's bits."""
        return _horner(_Q, f) * _bits_to_f32(_f32_to_bits(kb) << _I23)

    @_jit(inline="always", **_JIT)
    def _exp2(y):
        """float32 2^y for the decays (the hot loop): 11 vector operations after the clamp.

        Max relative error 1.4 ulp; results below 2^-126 flush to 0 and above 2^127.5 are
        inf.  The decays use exp(dt A) = 2^(dt (A log2 e)): the extra rounding of
        A log2 e is of the same order as that of the fp32 product dt A itself.
        Adding _MAGIC_127 rounds y to the integer k and leaves k + 127 in the low bits of
        the sum, so one shift makes the scale 2^k (k = -127 gives 0, k = 128 inf)."""
        yc = _Y_LO if y < _Y_LO else y  # comparisons written so that NaN passes through
        yc = _Y_HI if yc > _Y_HI else yc
        kb = yc + _MAGIC_127
        return _scaled_pow2(yc - (kb - _MAGIC_127), kb)  # f exact, in [-1/2, 1/2]

    @_jit(inline="always", **_JIT)
    def _decay(d, a2):
        """2^(d a2) for |d a2| <= _FAST_LIM (_steps_in checks it): 11 vector operations.

        One fma rounds the exact product d a2 to the integer k (as _exp2, in the low bits of
        kb = d a2 + _MAGIC_127), a second gives f = d a2 - k from the exact product again, so
        d a2 is never rounded on its own.  In range 2^k is a normal number: no clamping."""
        kb = _fma(d, a2, _MAGIC_127)
        return _scaled_pow2(_fma(d, a2, _MAGIC_127 - kb), kb)  # _MAGIC_127 - kb = -k exactly

    @_jit(inline="always", **_JIT)
    def _sigmoid(x):
        return _ONE / (_ONE + _exp(-x))

    @_jit(inline="always", **_JIT)
    def _silu(x):
        """x sigmoid(x) as x / (1 + e^-x): one division and one rounding fewer."""
        return x / (_ONE + _exp(-x))

    @_jit(inline="always", **_JIT)
    def _log1p_unit(e):
        """log(1 + e) for e in [0, 1]: e p(e), p the degree-10 polynomial _LP (1.45 ulp).
        Eleven fmas and a product: faster than the atanh series, whose division alone
        costs about as much (2.5 ulp)."""
        return e * _horner(_LP, e)

    @_jit(inline="always", **_JIT)
    def _softplus(x):
        """log(1 + e^x) = max(x, 0) + log1p(e^-|x|)."""
        return max(x, _ZERO) + _log1p_unit(_exp(-abs(x)))

    @_jit(inline="always", **_JIT)
    def _softplus_sigmoid(x):
        """softplus(x) and its derivative sigmoid(x), sharing e = e^-|x|:
        sigmoid = 1 / (1 + e) for x >= 0, e / (1 + e) below."""
        e = _exp(-abs(x))
        return max(x, _ZERO) + _log1p_unit(e), (_ONE if x >= _ZERO else e) / (_ONE + e)

    # A work item is one batch row b x channels c0:c0+w of group g.  Time goes in chunks of
    # K steps (the checkpoint interval).  Per chunk, the work per (time, channel) (softplus,
    # gates, ...) runs as long vector loops over the item's channels into chunk buffers
    # (K, wp); the recurrence runs per sub-block of _LANES channels (one 512-bit vector),
    # with state arrays laid out (sub-block, state, lane).  wp = w rounded up to whole
    # sub-blocks; the padding lanes hold zeros throughout (dt = 0, u = 0, state 0, A = 0),
    # so for finite inputs they add exact zeros to the lane sums of dB and dC.

    @_jit(**_JIT)
    def _steps_in(dl, u, D, bias, softplus, b, t0, L, c0, w, dts, dus, ys, sgs, span, bad, fast):
        """Chunk steps t0:t0+L: dts = delta', dus = delta' u, ys = D u (where y accumulates);
        with softplus and a non-empty sgs also sgs = d delta' / d delta = sigmoid(delta + bias).

        fast[s] = whether _decay may run for sub-block s in this chunk: every exponent
        delta' A log2 e in [-_FAST_LIM, _FAST_LIM].  span (w,) = each channel's max
        |A log2 e| (NaN when one is not finite), so |delta'| span <= _FAST_LIM bounds them
        all; NaN or infinite delta' or A fail it (then the clamping _exp2 runs).  Counted
        per channel into the scratch bad (w,) inside the long vector loop."""
        _wide_vectors()
        _no_overlap()
        for c in range(w):
            bad[c] = _ZERO
        for j in range(L):
            dr, ur = dl[b, t0 + j, c0:c0 + w], u[b, t0 + j, c0:c0 + w]
            dv, xv, yv = dts[j], dus[j], ys[j]
            if softplus and sgs.shape[0]:
                sg = sgs[j]
                for c in range(w):
                    dv[c], sg[c] = _softplus_sigmoid(dr[c] + bias[c])
            elif softplus:
                for c in range(w):
                    dv[c] = _softplus(dr[c] + bias[c])
            else:
                for c in range(w):
                    dv[c] = dr[c] + bias[c]
            for c in range(w):
                xv[c] = dv[c] * ur[c]
                yv[c] = D[c] * ur[c]
                bad[c] += _ZERO if abs(dv[c]) * span[c] <= _FAST_LIM else _ONE
        for s in range(fast.shape[0]):
            ok = True
            for c in range(s * _LANES, min(w, (s + 1) * _LANES)):
                ok = ok and bad[c] == _ZERO
            fast[s] = ok

    @_jit(**_JIT)
    def _scan_block(A2, fast, h, Bm, Cm, b, g, t0, L, s, dts, dus, ys):
        """The recurrence over chunk steps t0:t0+L for sub-block s: updates its state h
        (state, lane) in place and accumulates sum_n C h into ys (step, sub-block, lane).
        A2 = A log2 e (state, lane).  Inner loops of exactly _LANES: one vector each, with
        y kept in a register across the states.  fast: every decay exponent of the chunk is
        in _decay's range (_steps_in's check), else the clamping _exp2."""
        _wide_vectors()
        _no_overlap()
        N = A2.shape[0]
        for j in range(L):
            br, cr = Bm[b, t0 + j, g], Cm[b, t0 + j, g]
            dv, xv, yv = dts[j, s], dus[j, s], ys[j, s]
            for n in range(N):
                bn, cn, hn, an = br[n], cr[n], h[n], A2[n]
                if fast:
                    for c in range(_LANES):
                        hv = _fma(_decay(dv[c], an[c]), hn[c], xv[c] * bn)
                        hn[c] = hv
                        yv[c] = _fma(cn, hv, yv[c])
                else:
                    for c in range(_LANES):
                        hv = _fma(_exp2(dv[c] * an[c]), hn[c], xv[c] * bn)
                        hn[c] = hv
                        yv[c] = _fma(cn, hv, yv[c])

    @_jit(**_JIT)
    def _steps_out(z, has_z, b, t0, L, c0, w, ys, y):
        """y = ys (= D u + C h) gated by silu(z), for chunk steps t0:t0+L."""
        _wide_vectors()
        _no_overlap()
        for j in range(L):
            yr, yv = y[b, t0 + j, c0:c0 + w], ys[j]
            if has_z:
                zr = z[b, t0 + j, c0:c0 + w]
                for c in range(w):
                    yr[c] = yv[c] * _silu(zr[c])
            else:
                for c in range(w):
                    yr[c] = yv[c]

    @_jit(**_JIT)
    def _zeros64(shape):
        """fp32 zeros of ``shape`` starting on a 64-byte boundary.  numba's own arrays start
        32 bytes into a cache line, so every 512-bit access to them would straddle two lines
        (two L1 accesses, and slow split stores): ~10% of the kernel's time."""
        n = 1
        for d in shape:
            n *= d
        raw = _np.zeros(n + _LANES, _np.float32)
        off = (-(raw.ctypes.data // 4)) % _LANES
        return raw[off:off + n].reshape(shape)

    @_jit(**_JIT)
    def _block_constants(A, c0, w, nsub):
        """A and A2 = A log2 e of the item as (sub-block, state, lane), zero padded, and for
        _steps_in each channel's max |A2| over the states (w,; NaN when not finite)."""
        N = A.shape[1]
        At = _zeros64((nsub, N, _LANES))
        A2 = _zeros64((nsub, N, _LANES))
        span = _np.zeros(w, _np.float32)
        for c in range(w):
            s, lane = c // _LANES, c % _LANES
            for n in range(N):
                At[s, n, lane] = A[c0 + c, n]
                A2[s, n, lane] = A[c0 + c, n] * _LOG2E
            top = _np.max(_np.abs(A2[s, :, lane]))
            span[c] = top if _np.isfinite(top) else _np.nan
        return At, A2, span

    @_jit(**_JIT)
    def _state_in(x, c0, w, h):
        """h (sub-block, state, lane) = x (channel, state) rows c0:c0+w."""
        for c in range(w):
            for n in range(x.shape[1]):
                h[c // _LANES, n, c % _LANES] = x[c0 + c, n]

    @_jit(**_JIT)
    def _state_out(h, c0, w, x):
        """x (channel, state) rows c0:c0+w = h (sub-block, state, lane)."""
        for c in range(w):
            for n in range(x.shape[1]):
                x[c0 + c, n] = h[c // _LANES, n, c % _LANES]

    @_jit(**_JIT)
    def _fwd_item(u, dl, A, Bm, Cm, D, z, bias, h0, y, hT, ck, b, g, c0, w, K, has_z, softplus, has_h0, save_ck):
        """Forward over all time steps of one work item; the state before every K-th step
        goes to ck when save_ck."""
        T = u.shape[1]
        N = A.shape[1]
        nsub = (w + _LANES - 1) // _LANES
        _, A2, span = _block_constants(A, c0, w, nsub)
        h = _zeros64((nsub, N, _LANES))
        if has_h0:
            _state_in(h0[b], c0, w, h)
        bufs = _zeros64((3, K, nsub * _LANES))  # zeros: the padding lanes stay 0
        dts, dus, ys = bufs[0], bufs[1], bufs[2]
        bufs3 = bufs.reshape((3, K, nsub, _LANES))  # the same, by sub-block
        dts3, dus3, ys3 = bufs3[0], bufs3[1], bufs3[2]
        no_sg = _np.empty((0, 0), _np.float32)
        bad = _np.empty(w, _np.float32)
        fast = _np.empty(nsub, _np.bool_)
        for k in range((T + K - 1) // K):
            t0 = k * K
            L = min(K, T - t0)
            if save_ck:
                _state_out(h, c0, w, ck[b, k].T)
            _steps_in(dl, u, D[c0:c0 + w], bias[c0:c0 + w], softplus, b, t0, L, c0, w, dts, dus, ys, no_sg, span, bad,
                      fast)
            for s in range(nsub):
                _scan_block(A2[s], fast[s], h[s], Bm, Cm, b, g, t0, L, s, dts3, dus3, ys3)
            _steps_out(z, has_z, b, t0, L, c0, w, ys, y)
        _state_out(h, c0, w, hT[b])

    @_jit(parallel=True, **_JIT)
    def _fwd_kernel(u, dl, A, Bm, Cm, D, z, bias, h0, y, hT, ck, items, K, has_z, softplus, has_h0, save_ck):
        for i in _nb.prange(items.shape[0]):
            _fwd_item(u, dl, A, Bm, Cm, D, z, bias, h0, y, hT, ck, items[i, 0], items[i, 1], items[i, 2],
                      items[i, 3], K, has_z, softplus, has_h0, save_ck)

    @_jit(**_JIT)
    def _grads_in(dy, u, z, D, has_z, b, t0, L, c0, w, gys, sig_z, gus, gqs, gss, dDa):
        """Chunk steps t0:t0+L: gys = dL/d(D u + C h) = dy silu(z) (dy without z), sig_z =
        sigmoid(z) (for dz), gus = gys D (D's part of du), gqs = gss = 0; dDa += gys u."""
        _wide_vectors()
        _no_overlap()
        for j in range(L):
            dyr, ur = dy[b, t0 + j, c0:c0 + w], u[b, t0 + j, c0:c0 + w]
            gy, gu, gq, gs = gys[j], gus[j], gqs[j], gss[j]
            if has_z:
                zr, sz = z[b, t0 + j, c0:c0 + w], sig_z[j]
                for c in range(w):
                    sz[c] = _sigmoid(zr[c])
                    gy[c] = dyr[c] * (zr[c] * sz[c])
            else:
                for c in range(w):
                    gy[c] = dyr[c]
            for c in range(w):
                dDa[c] = _fma(gy[c], ur[c], dDa[c])
                gu[c] = gy[c] * D[c]
                gq[c] = _ZERO
                gs[c] = _ZERO

    @_jit(inline="always", **_JIT)
    def _rescan_lane(e, c, bn, cn, xv, gy, yv, h, hn, dec, pC):
        """Lane c of one state of _rescan_step, with its decay e."""
        dec[c] = e
        hv = _fma(e, h[c], xv[c] * bn)
        h[c] = hv
        hn[c] = hv
        yv[c] = _fma(cn, hv, yv[c])
        pC[c] = _fma(gy[c], hv, pC[c])

    @_jit(inline="always", **_JIT)
    def _rescan_step(A2, fast, br, cr, dv, xv, gy, yv, h, hn, dec, pC):
        """One step of _rescan_block: updates the running state h in place and copies it to
        hn, dec = its decays (state, lane); yv += sum_n C h; pC (state, lane) += gy h, dC's
        partial sums.  The decays as in _scan_block (fast: _decay).  The running state stays
        in one place, as in _scan_block: reading it from the previous step's hs row instead
        made this loop ~1.4x slower."""
        for n in range(A2.shape[0]):
            bn, cn, hv_, hnn, an, decn, pCn = br[n], cr[n], h[n], hn[n], A2[n], dec[n], pC[n]
            if fast:
                for c in range(_LANES):
                    _rescan_lane(_decay(dv[c], an[c]), c, bn, cn, xv, gy, yv, hv_, hnn, decn, pCn)
            else:
                for c in range(_LANES):
                    _rescan_lane(_exp2(dv[c] * an[c]), c, bn, cn, xv, gy, yv, hv_, hnn, decn, pCn)

    @_jit(**_JIT)
    def _rescan_block(A2, fast, h0, h, Bm, Cm, b, g, t0, L, s, dts, dus, gys, ys, hs, decs, accC):
        """_scan_block again from the chunk's first state h0, keeping what backward needs:
        hs[j] = state before step t0 + j (j <= L), decs[j] = decay of step t0 + j, both
        (state, lane); ys accumulates sum_n C h (y before the gate) and accC (step, state,
        lane) the lane partial sums of dC = sum gy h (per lane, over sub-blocks).  h (state,
        lane): scratch for the running state."""
        _wide_vectors()
        _no_overlap()
        N = A2.shape[0]
        for n in range(N):
            for c in range(_LANES):
                hs[0, n, c] = h0[n, c]
                h[n, c] = h0[n, c]
        for j in range(L):
            _rescan_step(A2, fast, Bm[b, t0 + j, g], Cm[b, t0 + j, g], dts[j, s], dus[j, s], gys[j, s], ys[j, s], h,
                         hs[j + 1], decs[j], accC[j])

    @_jit(inline="always", **_JIT)
    def _reverse_step(At, dh, dA, br, cr, dv, xv, gy, gq, gs, hp, dec, pB):
        """One step of _reverse_block (see there); hp, dec, pB: (state, lane) of the step."""
        for n in range(At.shape[0]):
            bn, cn, hpn, decn, an, dhn, dAn, pBn = br[n], cr[n], hp[n], dec[n], At[n], dh[n], dA[n], pB[n]
            for c in range(_LANES):
                g_ = _fma(cn, gy[c], dhn[c])
                gdh = g_ * (decn[c] * hpn[c])
                gq[c] = _fma(gdh, an[c], gq[c])
                gs[c] = _fma(g_, bn, gs[c])
                dAn[c] = _fma(gdh, dv[c], dAn[c])
                dhn[c] = g_ * decn[c]
                pBn[c] = _fma(g_, xv[c], pBn[c])

    @_jit(**_JIT)
    def _reverse_block(At, dh, dA, Bm, Cm, b, g, t0, L, s, dts, dus, gys, hs, decs, gqs, gss, accB):
        """Walk chunk steps t0+L-1 .. t0 backwards for sub-block s.

        h_t = dec h_{t-1} + dt B u, y_t += C h_t:  with g = dL/dh_t (this step's part
        C gy plus the part from step t+1 in dh),
          dL/dh_{t-1} = g dec,  dL/dA += g dec h_{t-1} dt,  dL/dB += g dt u,
          dL/d dt += sum_n g dec h_{t-1} A + u sum_n g B,  dL/du += dt sum_n g B
        (dL/dC = gy h_t is summed in _rescan_block).  Per step, gqs gets sum_n g dec h_{t-1} A
        and gss sum_n g B (step, sub-block, lane; _grads_out combines them); dh, dA, At:
        (state, lane) of this sub-block; accB (step, state, lane): dB's lane partial sums."""
        _wide_vectors()
        _no_overlap()
        for j in range(L - 1, -1, -1):
            _reverse_step(At, dh, dA, Bm[b, t0 + j, g], Cm[b, t0 + j, g], dts[j, s], dus[j, s], gys[j, s], gqs[j, s],
                          gss[j, s], hs[j], decs[j], accB[j])

    @_jit(**_JIT)
    def _lane_sums(acc, L, out, t0):
        """out[t0 + j, n] = sum of the lanes of acc[j, n] (in lane order)."""
        for j in range(L):
            o = out[t0 + j]
            for n in range(acc.shape[1]):
                a = acc[j, n]
                sm = _ZERO
                for c in range(_LANES):
                    sm += a[c]
                o[n] = sm

    @_jit(**_JIT)
    def _grads_out(dy, u, z, has_z, softplus, b, t0, L, c0, w, ys, sig_z, sgs, dts, gus, gqs, gss, du, ddl, dz, dba):
        """Chunk steps t0:t0+L: write du = gus + dt gss, ddelta = gqs + u gss (through
        softplus: times sgs) and dz (from y before the gate, ys, and sig_z); dba += ddelta."""
        _wide_vectors()
        _no_overlap()
        if has_z:
            for j in range(L):
                dyr, zr, dzr, yv, sz = dy[b, t0 + j, c0:c0 + w], z[b, t0 + j, c0:c0 + w], dz[b, t0 + j, c0:c0 + w], \
                    ys[j], sig_z[j]
                for c in range(w):
                    dzr[c] = dyr[c] * yv[c] * (sz[c] * (_ONE + zr[c] * (_ONE - sz[c])))
        for j in range(L):
            ur, dur, ddr = u[b, t0 + j, c0:c0 + w], du[b, t0 + j, c0:c0 + w], ddl[b, t0 + j, c0:c0 + w]
            dv, gu, gq, gs = dts[j], gus[j], gqs[j], gss[j]
            for c in range(w):
                gq[c] = _fma(ur[c], gs[c], gq[c])
            if softplus:
                sg = sgs[j]
                for c in range(w):
                    gq[c] = gq[c] * sg[c]
            for c in range(w):
                dur[c] = _fma(dv[c], gs[c], gu[c])
                ddr[c] = gq[c]
                dba[c] += gq[c]

    @_jit(**_JIT)
    def _bwd_item(u, dl, A, Bm, Cm, D, z, bias, ck, dy, dhT, du, ddl, dz, dA, dD, dbias, dB, dC, dh0,
                  b, g, c0, w, K, has_z, softplus):
        """Backward of one work item, chunk by chunk from the last: per sub-block, recompute
        the chunk's states from its checkpoint, then walk them in reverse.  dA, dD, dbias,
        dh0 are this item's own slices; dB, dC (time, state) its own sums over its channels."""
        T = u.shape[1]
        N = A.shape[1]
        nsub = (w + _LANES - 1) // _LANES
        At, A2, span = _block_constants(A, c0, w, nsub)
        dh = _zeros64((nsub, N, _LANES))  # gradient of the state after the current step
        _state_in(dhT[b], c0, w, dh)
        dAa = _zeros64((nsub, N, _LANES))
        h0 = _zeros64((nsub, N, _LANES))
        dDa = _np.zeros(w, _np.float32)
        dba = _np.zeros(w, _np.float32)
        bufs = _zeros64((9, K, nsub * _LANES))  # zeros: the padding lanes stay 0
        dts, dus, ys, sgs, gys, sig_z, gus, gqs, gss = bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5], bufs[6], \
            bufs[7], bufs[8]
        bufs3 = bufs.reshape((9, K, nsub, _LANES))  # the same, by sub-block
        dts3, dus3, ys3, gys3, gqs3, gss3 = bufs3[0], bufs3[1], bufs3[2], bufs3[4], bufs3[7], bufs3[8]
        hs = _zeros64((K + 1, N, _LANES))
        h = _zeros64((N, _LANES))
        decs = _zeros64((K, N, _LANES))
        accB = _zeros64((K, N, _LANES))
        accC = _zeros64((K, N, _LANES))
        Dv, bv = D[c0:c0 + w], bias[c0:c0 + w]
        bad = _np.empty(w, _np.float32)
        fast = _np.empty(nsub, _np.bool_)
        for k in range((T + K - 1) // K - 1, -1, -1):
            t0 = k * K
            L = min(K, T - t0)
            _state_in(ck[b, k].T, c0, w, h0)
            _steps_in(dl, u, Dv, bv, softplus, b, t0, L, c0, w, dts, dus, ys, sgs, span, bad, fast)
            _grads_in(dy, u, z, Dv, has_z, b, t0, L, c0, w, gys, sig_z, gus, gqs, gss, dDa)
            accB[:] = _ZERO
            accC[:] = _ZERO
            for s in range(nsub):
                _rescan_block(A2[s], fast[s], h0[s], h, Bm, Cm, b, g, t0, L, s, dts3, dus3, gys3, ys3, hs, decs, accC)
                _reverse_block(At[s], dh[s], dAa[s], Bm, Cm, b, g, t0, L, s, dts3, dus3, gys3, hs, decs, gqs3, gss3,
                               accB)
            _grads_out(dy, u, z, has_z, softplus, b, t0, L, c0, w, ys, sig_z, sgs, dts, gus, gqs, gss, du, ddl, dz, dba)
            _lane_sums(accB, L, dB, t0)
            _lane_sums(accC, L, dC, t0)
        _state_out(dh, c0, w, dh0[b])
        _state_out(dAa, c0, w, dA[b])
        dD[b, c0:c0 + w] = dDa
        dbias[b, c0:c0 + w] = dba

    @_jit(parallel=True, **_JIT)
    def _bwd_kernel(u, dl, A, Bm, Cm, D, z, bias, ck, dy, dhT, du, ddl, dz, dA, dD, dbias, dB, dC, dh0,
                    items, K, has_z, softplus):
        for i in _nb.prange(items.shape[0]):
            _bwd_item(u, dl, A, Bm, Cm, D, z, bias, ck, dy, dhT, du, ddl, dz, dA, dD, dbias, dB[i], dC[i], dh0,
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

    Wide blocks run faster (a time step's rows stream better from memory and the work per
    row is amortised: at 1536 channels and 2 threads, two items of 768 channels take
    ~0.8x the time of four of 384), so: as few blocks per group as give every thread an
    item, each at most ``_BLOCK`` channels (a multiple of that count otherwise, to keep
    the items even), widths a multiple of ``_LANES`` and at least ``_MIN_BLOCK``."""
    per = channels // groups
    base = max(1, -(-threads // (batch * groups)))
    blocks = base * -(-per // (base * _BLOCK))
    width = max(_MIN_BLOCK, -(-per // blocks))
    width = min(per, -(-width // _LANES) * _LANES)
    rows = [(b, g, c0, min(width, g * per + per - c0))
            for b in range(batch) for g in range(groups) for c0 in range(g * per, (g + 1) * per, width)]
    return _np.asarray(rows, dtype=_np.int64).reshape(-1, 4)


def _item_sum(x: torch.Tensor, batch: int, groups: int) -> torch.Tensor:
    """Per-item sums ``(items, time, state)`` -> ``(batch, time, groups, state)``: the items
    of each (batch row, group) added in item order (deterministic whatever thread ran them)."""
    parts = x.view(batch, groups, x.shape[0] // (batch * groups), *x.shape[1:])
    total = parts[:, :, 0].clone()
    for i in range(1, parts.shape[2]):
        total += parts[:, :, i]
    return total.transpose(1, 2)


def _np32(x: torch.Tensor | None, ndim: int):
    """fp32 C-contiguous numpy view (a copy only when needed); an empty array for None."""
    if x is None:
        return _np.zeros((0,) * ndim, _np.float32)
    return x.detach().to(torch.float32).contiguous().numpy()


def _vec(x: torch.Tensor | None, channels: int):
    """D / delta_bias as an fp32 ``(channels,)`` array (zeros when absent: adds 0, gradient unused)."""
    return _np.zeros(channels, _np.float32) if x is None else _np32(x, 1)


class _Threads:
    """Run numba with torch's thread count (capped at numba's pool size), handing out the
    work items one at a time (a thread slowed by other load takes fewer of them)."""

    def __enter__(self):
        self.old_torch = torch.get_num_threads()  # first: numba's first use starts its pool and resets it
        self.old = _nb.get_num_threads()
        _nb.set_num_threads(max(1, min(self.old_torch, _nb.config.NUMBA_NUM_THREADS)))
        self.old_chunk = _nb.set_parallel_chunksize(1)
        return _nb.get_num_threads()

    def __exit__(self, *exc):
        _nb.set_parallel_chunksize(self.old_chunk)
        _nb.set_num_threads(self.old)
        # numba's OpenMP layer shares the thread count with torch: restoring numba's
        # would otherwise overwrite a torch.set_num_threads the caller made.
        torch.set_num_threads(self.old_torch)


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
            du, ddelta = torch.empty(u.shape, dtype=f32), torch.empty(u.shape, dtype=f32)
            dz = torch.empty(u.shape if z is not None else (0, 0, 0), dtype=f32)
            dA = torch.empty(batch, channels, n, dtype=f32)
            dD, dbias = torch.empty(batch, channels, dtype=f32), torch.empty(batch, channels, dtype=f32)
            dB = torch.empty(items.shape[0], time, n, dtype=f32)  # per item: summed over its channels
            dC = torch.empty(items.shape[0], time, n, dtype=f32)
            dh0 = torch.empty(batch, channels, n, dtype=f32)
            _bwd_kernel(_np32(u, 3), _np32(delta, 3), _np32(A, 2), _np32(B4, 4), _np32(C4, 4), _vec(D, channels),
                        _np32(z, 3), _vec(delta_bias, channels), ck.numpy(), _np32(dy, 3), _np32(dhT, 3),
                        du.numpy(), ddelta.numpy(), dz.numpy(), dA.numpy(), dD.numpy(), dbias.numpy(), dB.numpy(),
                        dC.numpy(), dh0.numpy(), items, _CKPT, z is not None, ctx.softplus)
        need = ctx.needs_input_grad
        out = lambda g, x, i: g.to(x.dtype) if need[i] else None  # noqa: E731
        return (
            out(du, u, 0), out(ddelta, delta, 1), out(dA.sum(0), A, 2), out(_item_sum(dB, batch, groups), B4, 3),
            out(_item_sum(dC, batch, groups), C4, 4), None if D is None else out(dD.sum(0), D, 5),
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

"""fp32 maths for the numba kernels (the selective scan's and the fused Mamba decode step's).

Importing this module imports numba (and llvmlite and numpy with it); callers catch the
ImportError and fall back or report it.

The elementwise functions (exp, exp2, decay, sigmoid, silu, softplus, softplus_sigmoid)
take and return fp32 scalars and are inlined into their caller, written so that LLVM
vectorises them inside the caller's loops: numba's libm ``exp`` does not vectorise (no
SVML), so they are polynomials over fused multiply-adds and bit operations.  No
fast-math: plain IEEE fp32 with FMA; error bounds are in the docstrings.  The intrinsics
give ``fma`` and the function attributes the kernels' loops rely on (``wide_vectors``,
``no_overlap``).

``jit`` is ``numba.njit`` with the on-disk cache.  numba's cache checks only the file of
the function it compiled: a kernel of another module that inlines these helpers keeps its
cached machine code after a change here until its own file changes (or its cache files in
``__pycache__`` are removed).
"""

from __future__ import annotations

import warnings

import numba
import numba.core.types as nbtypes
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

# The options of every kernel that computes in exact IEEE fp32: no fast-math, and numpy's
# error model (division by zero gives inf or NaN, without a branch to raise).
IEEE = dict(fastmath=False, error_model="numpy")

_f32 = np.float32
LOG2E = _f32(1.4426950408889634)
ZERO, ONE = _f32(0.0), _f32(1.0)
# |exponent| up to which ``decay`` may run; 125, not 126: callers bound the exponent from
# the product d a2 rounded once.
DECAY_LIMIT = _f32(125.0)

_LN2_HI = _f32(-0.693359375)  # negated: used as fma(k, -ln2, x)
_LN2_LO = _f32(2.12194440e-4)
_E0, _E1, _E2 = _f32(1.9875691500e-4), _f32(1.3981999507e-3), _f32(8.3334519073e-3)
_E3, _E4, _E5 = _f32(4.1665795894e-2), _f32(1.6666665459e-1), _f32(5.0000001201e-1)
_X_LO, _X_HI = _f32(-104.0), _f32(89.0)  # exp is 0 below and inf above (exactly rounded)
# 1.5 * 2**23 + 127: adding it rounds to an integer k (in IEEE code: fast-math would cancel a
# later subtraction) and leaves k + 127, the exponent bias, in the sum's low bits.
_MAGIC_127 = _f32(12582912.0 + 127.0)
# 2^f on [-1/2, 1/2]: degree-6 interpolant at Chebyshev nodes, max relative error 1.4 ulp.
_Q = (_f32(1.0), _f32(0.6931471824645996), _f32(0.24022650718688965), _f32(0.05550327152013779),
      _f32(0.009618056938052177), _f32(0.0013400427997112274), _f32(0.00015461444854736328))
_Y_LO, _Y_HI = _f32(-127.0), _f32(128.0)
# log1p(e) / e on [0, 1]: degree-10 interpolant at Chebyshev nodes (fp64 fit, rounded to
# fp32); e times it is log1p(e) within 1.45 ulp over [0, 1], with no division.
_LP = (_f32(1.0), _f32(-0.4999997913837433), _f32(0.33332496881484985), _f32(-0.24986496567726135),
       _f32(0.19885820150375366), _f32(-0.16087622940540314), _f32(0.12377995997667313),
       _f32(-0.08188041299581528), _f32(0.041006576269865036), _f32(-0.013187826611101627),
       _f32(0.001986696617677808))
_I127, _I23, _I1 = np.int32(127), np.int32(23), np.int32(1)

_NO_CACHE_WARNED: list = []


def jit(**options):
    """numba.njit with the on-disk cache (next to the calling module, or, when that directory
    is read-only, in numba's user cache dir; ``NUMBA_CACHE_DIR`` overrides both).  If numba
    finds no writable cache directory, compile in memory and say so once."""

    def decorate(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if not _NO_CACHE_WARNED:
                _NO_CACHE_WARNED.append(True)
                warnings.warn(f"longctx.ops: {exc}; numba kernels will compile in every process "
                              "(~15 s). Set NUMBA_CACHE_DIR to a writable directory.", stacklevel=2)
            return numba.njit(cache=False, **options)(fn)

    return decorate


# ---------------------------------------------------------------------------------------
# LLVM intrinsics and function attributes


@intrinsic
def fma(typingctx, a, b, c):
    """IEEE fused multiply-add on float32 (one rounding; vectorises)."""
    sig = nbtypes.float32(nbtypes.float32, nbtypes.float32, nbtypes.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f], ir.FunctionType(f, [f, f, f]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def rint(typingctx, x):
    """float32 rounded to the nearest integer, ties to even (``llvm.rint``; vectorises).
    An intrinsic, so fast-math code around it cannot cancel it as it would ``(x + M) - M``."""
    sig = nbtypes.float32(nbtypes.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.rint", [f], ir.FunctionType(f, [f]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret int32 bits as float32."""
    sig = nbtypes.float32(nbtypes.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, x):
    """Reinterpret float32 as int32 bits."""
    sig = nbtypes.int32(nbtypes.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorise the calling function's loops with 512-bit registers.

    On AVX-512 CPUs LLVM's x86 tuning prefers 256-bit vectors (prefer-256-bit, against
    the clock drop of older parts), so numba's loops get 8 lanes; the function attribute
    ``"prefer-vector-width"="512"`` lifts that for this function only (16 lanes: the
    scan's recurrence runs ~1.3x faster).  Without AVX-512 it changes nothing.  llvmlite's
    attribute set only takes names it knows, hence ``set.add`` (emitted as is)."""
    sig = nbtypes.none()

    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def no_overlap(typingctx):
    """Promise LLVM that the calling function's float32 arrays do not overlap (``noalias``
    on their data pointers, including those of arrays inside tuple arguments, which numba
    passes as separate arguments).  The caller must guarantee it for every array it writes:
    distinct arrays, or disjoint rows of one.  Without it the vectoriser must check every
    pair of arrays at run time before each inner loop (too many pairs: it gives up) and
    cannot keep an accumulator in a register across a loop."""
    sig = nbtypes.none()

    def codegen(context, builder, signature, args):
        for arg in builder.function.args:
            if isinstance(arg.type, ir.PointerType) and arg.type.pointee == ir.FloatType():
                arg.add_attribute("noalias")
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------
# Elementwise functions


@jit(inline="always", **IEEE)
def exp(x):
    """float32 exp, max relative error 1.4 ulp (normal and subnormal results).

    x = k ln2 + r, |r| <= ln2 / 2 (two-part ln2); e^r by Cephes' expf polynomial;
    the rounding to k is an intrinsic, so it also holds inlined into fast-math kernels;
    2^k applied as two factors 2^(k//2) 2^(k - k//2) so results down to the smallest
    subnormal round correctly and 2^128 overflows to inf."""
    xc = _X_LO if x < _X_LO else x  # comparisons written so that NaN passes through
    xc = _X_HI if xc > _X_HI else xc
    k = rint(xc * LOG2E)
    r = fma(k, _LN2_HI, xc)
    r = fma(k, _LN2_LO, r)
    p = fma(_E0, r, _E1)
    p = fma(p, r, _E2)
    p = fma(p, r, _E3)
    p = fma(p, r, _E4)
    p = fma(p, r, _E5)
    p = fma(p, r * r, r) + ONE
    ki = np.int32(k)
    k1 = ki >> _I1
    s1 = _bits_to_f32((k1 + _I127) << _I23)
    s2 = _bits_to_f32((ki - k1 + _I127) << _I23)
    return (p * s1) * s2


@jit(inline="always", **IEEE)
def _horner(c, x):
    """c[0] + c[1] x + ... + c[-1] x^(len(c) - 1), one fma per coefficient (a loop of
    constant length over a constant tuple: LLVM unrolls it into the same fma chain)."""
    p = c[len(c) - 1]
    for k in range(len(c) - 2, -1, -1):
        p = fma(p, x, c[k])
    return p


@jit(inline="always", **IEEE)
def _scaled_pow2(f, kb):
    """2^f 2^k for f in [-1/2, 1/2] and kb = k + _MAGIC_127 (k + 127 in its low bits):
    the degree-6 polynomial, then the scale made by one shift of kb's bits."""
    return _horner(_Q, f) * _bits_to_f32(_f32_to_bits(kb) << _I23)


@jit(inline="always", **IEEE)
def exp2(y):
    """float32 2^y: 11 vector operations after the clamp.

    Max relative error 1.4 ulp; results below 2^-126 flush to 0 (which also keeps slow
    subnormals out of a recurrence) and above 2^127.5 are inf; NaN passes through.  For a
    decay exp(d A) = 2^(d (A log2 e)): the extra rounding of A log2 e is of the same order
    as that of the fp32 product d A itself.  Adding _MAGIC_127 rounds y to the integer k
    and leaves k + 127 in the low bits of the sum, so one shift makes the scale 2^k
    (k = -127 gives 0, k = 128 inf)."""
    yc = _Y_LO if y < _Y_LO else y  # comparisons written so that NaN passes through
    yc = _Y_HI if yc > _Y_HI else yc
    kb = yc + _MAGIC_127
    return _scaled_pow2(yc - (kb - _MAGIC_127), kb)  # f exact, in [-1/2, 1/2]


@jit(inline="always", **IEEE)
def decay(d, a2):
    """2^(d a2) for |d a2| <= DECAY_LIMIT (the caller checks it): 11 vector operations.

    One fma rounds the exact product d a2 to the integer k (as exp2, in the low bits of
    kb = d a2 + _MAGIC_127), a second gives f = d a2 - k from the exact product again, so
    d a2 is never rounded on its own.  In range 2^k is a normal number: no clamping."""
    kb = fma(d, a2, _MAGIC_127)
    return _scaled_pow2(fma(d, a2, _MAGIC_127 - kb), kb)  # _MAGIC_127 - kb = -k exactly


@jit(inline="always", **IEEE)
def sigmoid(x):
    """1 / (1 + e^-x)."""
    return ONE / (ONE + exp(-x))


@jit(inline="always", **IEEE)
def silu(x):
    """x sigmoid(x) as x / (1 + e^-x): one division and one rounding fewer."""
    return x / (ONE + exp(-x))


@jit(inline="always", **IEEE)
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1]: e p(e), p the degree-10 polynomial _LP (1.45 ulp).
    Eleven fmas and a product: faster than the atanh series, whose division alone
    costs about as much (2.5 ulp)."""
    return e * _horner(_LP, e)


@jit(inline="always", **IEEE)
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|)."""
    return max(x, ZERO) + _log1p_unit(exp(-abs(x)))


@jit(inline="always", **IEEE)
def softplus_sigmoid(x):
    """softplus(x) and its derivative sigmoid(x), sharing e = e^-|x|:
    sigmoid = 1 / (1 + e) for x >= 0, e / (1 + e) below."""
    e = exp(-abs(x))
    return max(x, ZERO) + _log1p_unit(e), (ONE if x >= ZERO else e) / (ONE + e)

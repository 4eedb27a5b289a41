"""One decoding step of a Mamba-1 block's inner part, fused into one CPU kernel.

Between ``in_proj`` and ``out_proj`` a Mamba block runs ~30 small torch ops per token
(conv tail, SiLU, x_proj, dt_proj, softplus, the state update, D, the gate); with one
token each costs more in dispatch than in arithmetic.  ``mamba_decode_step`` does them
all in one numba call (inference only: no autograd); ``mamba_decode_step_ref`` is the
same step in torch ops (the layer's own decode path, kept for gradients and other
devices), and tests compare the two.

Shapes: xz ``(batch, 2 * channels)`` (in_proj's output: x then z); conv_state
``(batch, channels, kernel - 1)``; conv_weight ``(channels, 1, kernel)`` (``nn.Conv1d``'s depthwise layout); conv_bias
``(channels,)`` or None; x_proj_weight ``(dt_rank + 2 * state, channels)``;
dt_proj_weight ``(channels, dt_rank)``; dt_bias, D ``(channels,)``; A_log ``(channels, state)``
(A = ``-exp(A_log)``); ssm_state ``(batch, channels, state)``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from longctx.ops.scan import ssm_step

try:  # the fp32 maths shared by the numba kernels (imports numba)
    import numpy as _np

    from longctx.ops.numba_math import IEEE, LOG2E, ZERO, exp2, fma, jit, silu, softplus

    _HAVE_NUMBA = True
except ImportError:
    _HAVE_NUMBA = False


def mamba_decode_step_ref(xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D,
                          ssm_state):
    """The step in torch ops.  Returns y ``(batch, channels)`` (before out_proj), the new
    conv state and the new SSM state."""
    channels = conv_weight.shape[0]
    state = A_log.shape[1]
    x, z = xz.split(channels, dim=-1)
    full = torch.cat([conv_state.to(x.dtype), x[:, :, None]], dim=-1)
    x = (full * conv_weight[:, 0]).sum(-1)
    x = F.silu(x if conv_bias is None else x + conv_bias)
    dt_rank = x_proj_weight.shape[0] - 2 * state
    dt, B, C = F.linear(x, x_proj_weight).split([dt_rank, state, state], dim=-1)
    A = -torch.exp(A_log.float())
    y, h = ssm_step(x, F.linear(dt, dt_proj_weight), A, B, C, ssm_state, D=D, z=z, delta_bias=dt_bias,
                    delta_softplus=True)
    return y, full[:, :, 1:], h


def mamba_decode_step(xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D,
                      ssm_state):
    """``mamba_decode_step_ref`` in one numba kernel: same arguments and results (fp32, CPU,
    no gradients).  Falls back to the reference where the kernel cannot run (other
    devices or dtypes, gradients needed, numba missing)."""
    args = (xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, ssm_state)
    if not _HAVE_NUMBA or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)):
        return mamba_decode_step_ref(*args)
    weights = [_as_numpy(conv_weight, derive=lambda w: w[:, 0]), _as_numpy(A_log, derive=lambda a: -torch.exp(a))]
    weights += [_as_numpy(t) for t in (x_proj_weight, dt_proj_weight, dt_bias, D)]
    weights.append(_NO_BIAS if conv_bias is None else _as_numpy(conv_bias))
    inputs = (xz, conv_state, ssm_state)
    if any(w is None for w in weights) or not all(_fits(t) for t in inputs):
        return mamba_decode_step_ref(*args)
    outputs = (torch.empty(xz.shape[0], conv_weight.shape[0]), torch.empty_like(conv_state), torch.empty_like(ssm_state))
    _step_kernel(*(t.contiguous().numpy() for t in inputs), *weights, *(t.numpy() for t in outputs))
    return outputs


def _fits(t: torch.Tensor) -> bool:
    """Whether the kernel takes this tensor: fp32 on the CPU."""
    return t.dtype == torch.float32 and t.device.type == "cpu"


# numpy copies/views of weights, reused while a tensor keeps its storage and version:
# converting a tensor costs 1-4 us, and a step would convert seven.  Keyed by id, with the
# tensor held weakly (the entry goes when the tensor does).
_NUMPY: dict = {}


def _as_numpy(t: torch.Tensor, derive=None):
    """``derive(t)`` (or t) as a contiguous numpy array, cached for t's current data; None
    when the kernel cannot take t (see _fits)."""
    # Inference tensors have no version counter (in-place changes to them are not seen).
    key = (t.data_ptr(), None if t.is_inference() else t._version)
    hit = _NUMPY.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == key:
        return hit[2]
    if not _fits(t):
        return None
    value = t.detach() if derive is None else derive(t.detach())
    if hit is None or hit[0]() is not t:
        weakref.finalize(t, _NUMPY.pop, id(t), None)
    _NUMPY[id(t)] = (weakref.ref(t), key, value.contiguous().numpy())
    return _NUMPY[id(t)][2]


if _HAVE_NUMBA:
    _NO_BIAS = _np.zeros(0, _np.float32)
    # No array slices in the inner loops: each slice is a reference-counted object whose
    # refcount calls cost more than a 16-element loop.

    @jit(fastmath={"reassoc"}, error_model="numpy")
    def _matvec(W, x, out):
        """out[j] = sum_i W[j, i] x[i] over W's columns (x may be longer).  Reassociation
        only, so that LLVM vectorises the sums (in an order fixed per build)."""
        for j in range(W.shape[0]):
            s = ZERO
            for i in range(W.shape[1]):
                s += W[j, i] * x[i]
            out[j] = s

    @jit(**IEEE)
    def _step_kernel(xz, conv, h, cw, A, xw, dtw, dtb, D, cb, y, conv_out, h_out):
        batch, channels, tail = conv.shape
        state = A.shape[1]
        dt_rank = xw.shape[0] - 2 * state
        x = _np.empty(channels, _np.float32)
        proj = _np.empty(xw.shape[0], _np.float32)  # (dt, B, C)
        dt = _np.empty(channels, _np.float32)
        # Per (channel, state), flat: decay, input, and new state times C.  The update runs
        # as separate simple loops over flat arrays, which LLVM vectorises; one loop doing
        # it all stays scalar (too many arrays that might alias).
        dec = _np.empty(channels * state, _np.float32)
        inp = _np.empty(channels * state, _np.float32)
        hc = _np.empty(channels * state, _np.float32)
        Af = A.reshape(-1)
        for b in range(batch):
            # Causal conv over (tail, new input), then SiLU; the tail shifts by one.
            for c in range(channels):
                xin = xz[b, c]
                acc = ZERO
                for k in range(tail):
                    acc = fma(conv[b, c, k], cw[c, k], acc)
                acc = fma(xin, cw[c, tail], acc)
                if cb.shape[0]:
                    acc += cb[c]
                for k in range(tail - 1):
                    conv_out[b, c, k] = conv[b, c, k + 1]
                if tail > 0:
                    conv_out[b, c, tail - 1] = xin
                x[c] = silu(acc)
            _matvec(xw, x, proj)
            _matvec(dtw, proj, dt)  # the first dt_rank entries of proj
            for c in range(channels):
                dt[c] = softplus(dt[c] + dtb[c])
            for c in range(channels):  # decays as in the scan kernel: 2^(dt A log2 e)
                d = dt[c]
                du = d * x[c]
                for n in range(state):
                    dec[c * state + n] = exp2(d * (Af[c * state + n] * LOG2E))
                    inp[c * state + n] = du * proj[dt_rank + n]
            hb, ob = h[b].reshape(-1), h_out[b].reshape(-1)
            for i in range(channels * state):
                ob[i] = fma(dec[i], hb[i], inp[i])
            for c in range(channels):
                for n in range(state):
                    hc[c * state + n] = ob[c * state + n] * proj[dt_rank + state + n]
            for c in range(channels):
                s = ZERO
                for n in range(state):
                    s += hc[c * state + n]
                zc = xz[b, channels + c]
                y[b, c] = fma(D[c], x[c], s) * silu(zc)

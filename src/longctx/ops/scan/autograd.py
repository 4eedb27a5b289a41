"""``selective_scan``: the path per device, and the CPU kernels as an autograd Function.

On CPU the numba kernels run on fp32 numpy views of the tensors, split into work items
(blocks of channels of one batch row and group) over ``torch.get_num_threads()`` threads;
the autograd Function saves the inputs and the kernels' state checkpoints
``(batch, time / CKPT, state, channels)``, and its backward reruns the kernels.  Other
devices take the chunked torch scan.
"""

from __future__ import annotations

import torch

from longctx.ops.scan.chunked import scan_chunked
from longctx.ops.scan.reference import as4d, check_inputs

try:  # numba (with numpy) is the one non-torch dependency of ops, for the CPU kernels
    import numba
    import numpy as np

    from longctx.ops.scan.kernels import CKPT, LANES, Grads, Inputs, Outputs, bwd_kernel, fwd_kernel

    _NUMBA_ERROR = None
except ImportError as exc:  # reported when the CPU path is used, never silently replaced
    numba = None
    _NUMBA_ERROR = exc

# The widest and narrowest channel blocks of the work items.
_BLOCK = 1024
_MIN_BLOCK = 64


def _require_numba() -> None:
    if numba is None:
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
    the items even), widths a multiple of ``LANES`` and at least ``_MIN_BLOCK``."""
    per = channels // groups
    base = max(1, -(-threads // (batch * groups)))
    blocks = base * -(-per // (base * _BLOCK))
    width = max(_MIN_BLOCK, -(-per // blocks))
    width = min(per, -(-width // LANES) * LANES)
    rows = [(b, g, c0, min(width, g * per + per - c0))
            for b in range(batch) for g in range(groups) for c0 in range(g * per, (g + 1) * per, width)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


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
        return np.zeros((0,) * ndim, np.float32)
    return x.detach().to(torch.float32).contiguous().numpy()


def _vec(x: torch.Tensor | None, channels: int):
    """D / delta_bias as an fp32 ``(channels,)`` array (zeros when absent: adds 0, gradient unused)."""
    return np.zeros(channels, np.float32) if x is None else _np32(x, 1)


def _kernel_inputs(u, delta, A, B4, C4, D, z, delta_bias, initial_state, softplus: bool):
    """The kernels' Inputs from the tensors (B4, C4 ``(batch, time, groups, state)``)."""
    channels = u.shape[2]
    return Inputs(_np32(u, 3), _np32(delta, 3), _np32(A, 2), _np32(B4, 4), _np32(C4, 4), _vec(D, channels),
                  _np32(z, 3), _vec(delta_bias, channels), _np32(initial_state, 3), z is not None, bool(softplus),
                  initial_state is not None)


class _Threads:
    """Run numba with torch's thread count (capped at numba's pool size), handing out the
    work items one at a time (a thread slowed by other load takes fewer of them)."""

    def __enter__(self):
        self.old_torch = torch.get_num_threads()  # first: numba's first use starts its pool and resets it
        self.old = numba.get_num_threads()
        numba.set_num_threads(max(1, min(self.old_torch, numba.config.NUMBA_NUM_THREADS)))
        self.old_chunk = numba.set_parallel_chunksize(1)
        return numba.get_num_threads()

    def __exit__(self, *exc):
        numba.set_parallel_chunksize(self.old_chunk)
        numba.set_num_threads(self.old)
        # numba's OpenMP layer shares the thread count with torch: restoring numba's
        # would otherwise overwrite a torch.set_num_threads the caller made.
        torch.set_num_threads(self.old_torch)


def _numba_forward(u, delta, A, B4, C4, D, z, delta_bias, softplus: bool, initial_state, save_ck: bool):
    """Run the forward kernel; returns y (fp32), final state, checkpoints (or None)."""
    batch, time, channels = u.shape
    n = A.shape[1]
    y = torch.empty(batch, time, channels, dtype=torch.float32)
    hT = torch.empty(batch, channels, n, dtype=torch.float32)
    nck = (time + CKPT - 1) // CKPT
    ck = torch.empty((batch, nck, n, channels) if save_ck else (0, 0, 0, 0), dtype=torch.float32)
    with _Threads() as threads:
        items = _items(batch, channels, B4.shape[2], threads)
        x = _kernel_inputs(u, delta, A, B4, C4, D, z, delta_bias, initial_state, softplus)
        fwd_kernel(x, Outputs(y.numpy(), hT.numpy(), ck.numpy(), save_ck), items)
    return y, hT, (ck if save_ck else None)


class _NumbaScan(torch.autograd.Function):
    """The CPU kernels with their recomputing backward.  Saves the inputs and a state every
    ``CKPT`` steps ``(batch, time / CKPT, state, channels)``: nothing of size
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
            # No initial state: the backward starts every chunk from its checkpoint in ck.
            x = _kernel_inputs(u, delta, A, B4, C4, D, z, delta_bias, None, ctx.softplus)
            grads = Grads(_np32(dy, 3), _np32(dhT, 3), du.numpy(), ddelta.numpy(), dz.numpy(), dA.numpy(), dD.numpy(),
                          dbias.numpy(), dh0.numpy())
            bwd_kernel(x, ck.numpy(), grads, dB.numpy(), dC.numpy(), items)
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

    Path: on CPU the numba kernel (memory: inputs plus a state every CKPT = 16 steps, nothing of
    size time x channels x state); on other devices the chunked torch scan.
    """
    check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, step=False, name="selective_scan")
    if u.device.type != "cpu":
        return scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    _require_numba()
    B4, C4 = as4d(B), as4d(C)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _NumbaScan.apply(u, delta, A, B4, C4, D, z, delta_bias, initial_state, bool(delta_softplus))
    y, hT, _ = _numba_forward(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, initial_state, False)
    return y.to(u.dtype), hT

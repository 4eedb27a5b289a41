"""The selective scan in torch ops, for devices numba cannot run on.

``scan_chunked`` takes ``selective_scan``'s arguments and returns its results (computed in
fp32).  Time goes in chunks of ``CHUNK`` steps with a log-depth (Hillis-Steele) scan
inside each chunk; with gradients each chunk runs under activation checkpointing, so
memory stays linear in time without the state dimension.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from longctx.ops.scan.reference import as4d, discretize_delta, expand_groups, skip_and_gate

CHUNK = 64


def scan_chunk(h, u, dt, A, B4, C4):
    """One chunk of the scan in torch ops: ``(batch, L, channels)`` inputs (dt = delta'),
    B4, C4 ``(batch, L, groups, state)``, state ``h`` ``(batch, channels, state)`` before the
    chunk; returns (y without D/z ``(batch, L, channels)``, state after the chunk).

    Inside the chunk, a Hillis-Steele scan over the pairs (decay, input): log2(L) steps of
    elementwise products on ``(batch, L, channels, state)``; decays only multiply, so it
    is as stable as the sequential loop."""
    channels = u.shape[-1]
    decay = torch.exp(dt[..., None] * A)
    x = (dt * u)[..., None] * expand_groups(B4, channels)
    step = 1
    while step < decay.shape[1]:
        x = torch.cat([x[:, :step], x[:, step:] + decay[:, step:] * x[:, :-step]], 1)
        decay = torch.cat([decay[:, :step], decay[:, step:] * decay[:, :-step]], 1)
        step *= 2
    hs = x + decay * h[:, None]
    return (hs * expand_groups(C4, channels)).sum(-1), hs[:, -1]


def scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                 chunk=CHUNK):
    """selective_scan in torch ops over chunks of ``chunk`` steps (any device), fp32.

    With gradients each chunk runs under activation checkpointing: saved are the inputs
    and one state per chunk; the chunk's ``(batch, chunk, channels, state)`` tensors are
    rebuilt in backward."""
    batch, time, channels = u.shape
    f32 = lambda x: None if x is None else x.float()  # noqa: E731
    u_, A_, B4, C4 = f32(u), f32(A), as4d(f32(B)), as4d(f32(C))
    dt = discretize_delta(delta, delta_bias, delta_softplus, torch.float32)
    h = f32(initial_state) if initial_state is not None else u_.new_zeros(batch, channels, A.shape[1])
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    ys = []
    for t0 in range(0, time, chunk):
        args = (h, u_[:, t0:t0 + chunk], dt[:, t0:t0 + chunk], A_, B4[:, t0:t0 + chunk], C4[:, t0:t0 + chunk])
        y, h = checkpoint(scan_chunk, *args, use_reentrant=False) if grad else scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, 1) if ys else u_.new_zeros(batch, 0, channels)
    return skip_and_gate(y, u_, D, z).to(u.dtype), h

"""The selective scan's reference, the one-token step, and what all paths share.

Shapes as in ``longctx.ops.scan``: u, delta, z ``(batch, time, channels)`` (``(batch,
channels)`` for the step); A ``(channels, state)``; B, C ``(batch, time, state)`` or
``(batch, time, groups, state)``; D, delta_bias ``(channels,)``; states ``(batch,
channels, state)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_groups(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``(..., groups, state)`` -> ``(..., channels, state)``: each group repeated for its
    channels (one group stays a broadcastable size-1 axis: no copy)."""
    if x.shape[-2] == 1:
        return x
    return x.repeat_interleave(channels // x.shape[-2], dim=-2)


def as4d(x: torch.Tensor) -> torch.Tensor:
    """B or C as ``(batch, time, groups, state)`` (a view)."""
    return x.unsqueeze(2) if x.dim() == 3 else x


def discretize_delta(delta, delta_bias, delta_softplus: bool, dtype: torch.dtype) -> torch.Tensor:
    """``delta' = softplus?(delta + delta_bias)`` in ``dtype`` (both cast to it first)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    return F.softplus(delta) if delta_softplus else delta


def compute_dtype(*tensors) -> torch.dtype:
    """The widest dtype of ``tensors`` (Nones skipped), at least fp32."""
    dtype = torch.float32
    for x in tensors:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D, z) -> torch.Tensor:
    """``(y + D u) * silu(z)``, each part only when given, in y's dtype."""
    if D is not None:
        y = y + D.to(y.dtype) * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def check_inputs(u, delta, A, B, C, D, z, delta_bias, state, *, step: bool, name: str) -> int:
    """Validate shapes, dtypes and devices; return the number of groups of B and C.

    ``step`` selects ssm_step's layout (no time axis); ``name`` starts every message."""
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


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, initial_state=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: a Python loop over time.  Same arguments and results as
    ``selective_scan``; computes in the widest input dtype and at least fp32 (fp64 inputs
    stay fp64, and so does the returned final state).  ``(batch, channels, state)`` per
    step, nothing of size time x state; for tests and short inputs."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, step=False, name="selective_scan_ref")
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    batch, time, channels = u.shape
    B4, C4 = as4d(cast(B)), as4d(cast(C))
    dt = discretize_delta(delta, delta_bias, delta_softplus, dtype)
    A_, u_ = cast(A), cast(u)
    h = cast(initial_state) if initial_state is not None else u_.new_zeros(batch, channels, A.shape[1])
    ys = []
    # unbind, not dt[:, t]: the backward of unbind is one stack, that of indexing a full
    # zero tensor per step (quadratic in time).
    for u_t, dt_t, b_t, c_t in zip(u_.unbind(1), dt.unbind(1), B4.unbind(1), C4.unbind(1)):
        h = torch.exp(dt_t[..., None] * A_) * h + (dt_t * u_t)[..., None] * expand_groups(b_t, channels)
        ys.append((h * expand_groups(c_t, channels)).sum(-1))
    y = torch.stack(ys, 1) if ys else u_.new_zeros(batch, 0, channels)
    return skip_and_gate(y, u_, D, z).to(u.dtype), h


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
    check_inputs(u, delta, A, B, C, D, z, delta_bias, state, step=True, name="ssm_step")
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, state)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    channels = u.shape[-1]
    B3 = cast(B) if B.dim() == 3 else cast(B).unsqueeze(1)
    C3 = cast(C) if C.dim() == 3 else cast(C).unsqueeze(1)
    u_ = cast(u)
    dt = discretize_delta(delta, delta_bias, delta_softplus, dtype)
    new = torch.exp(dt[..., None] * cast(A)) * cast(state) + (dt * u_)[..., None] * expand_groups(B3, channels)
    y = (new * expand_groups(C3, channels)).sum(-1)
    return skip_and_gate(y, u_, D, z).to(u.dtype), new

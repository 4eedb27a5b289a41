"""Mamba-2's state-space duality (SSD): a scalar-decay selective SSM computed in chunks.

Layout throughout: ``(batch, time, heads, head_dim)``; ``B`` and ``C`` are
``(batch, time, groups, state)`` and head ``h`` reads group ``h // (heads // groups)``.

Per head, with ``dt'`` the discretised step (bias, softplus, clamp) and ``A_h < 0``::

    h_t = exp(dt'_t * A_h) * h_{t-1} + dt'_t * x_t (outer) B_t     # (head_dim, state)
    y_t = h_t @ C_t + D * x_t                                       # contract state

``ssd`` splits time into chunks of ``chunk_size`` (Dao & Gu 2024, "Transformers are SSMs";
``ssd_minimal.py`` in state-spaces/mamba):

1. inside a chunk the output is a masked, decay-weighted attention-like matmul
   ``((C B^T) * L) @ (dt x)`` with ``L[i, j] = exp(a_{j+1} + ... + a_i)`` from a stable
   segment sum (no differences of long cumulative sums);
2. each chunk's contribution to the state at its end is one matmul;
3. a short recurrence over chunks carries the state from chunk to chunk;
4. the state entering a chunk reaches its outputs through ``C`` and the decay so far.

Everything is matmuls, cumsums and elementwise ops, so plain autograd differentiates it
(initial and final state included); memory is ``O(time * chunk_size)`` per head plus one
``(head_dim, state)`` state per chunk.
``ssd_ref`` is the exact loop over time it is tested against; ``ssd_step`` advances one
token (decoding).
"""

from __future__ import annotations

import torch

_NO_LIMIT = (0.0, float("inf"))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 at least (fp64 inputs stay fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_inputs(op: str, x, dt, A, B, C, D, dt_bias, state, step: bool) -> None:
    """Validate shapes; ``step`` means no time axis (``ssd_step``)."""
    lead = "(batch, heads" if step else "(batch, time, heads"
    if x.dim() != (3 if step else 4):
        raise ValueError(f"{op}: x must have shape {lead}, head_dim); got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{op}: x must be a floating tensor; got {x.dtype}")
    bt, heads, head_dim = x.shape[:-2], x.shape[-2], x.shape[-1]
    if tuple(dt.shape) != (*bt, heads):
        raise ValueError(f"{op}: dt must have shape {lead}) = {(*bt, heads)}; got {tuple(dt.shape)}")
    if tuple(A.shape) != (heads,):
        raise ValueError(f"{op}: A must have shape (heads,) = ({heads},); got {tuple(A.shape)}")
    if B.dim() != x.dim() or tuple(B.shape[:-2]) != tuple(bt):
        raise ValueError(
            f"{op}: B must have shape {lead.replace('heads', 'groups')}, state) with the batch"
            f"{'' if step else ' and time'} of x {tuple(x.shape)}; got {tuple(B.shape)}"
        )
    if C.shape != B.shape:
        raise ValueError(f"{op}: C must have the shape of B {tuple(B.shape)}; got {tuple(C.shape)}")
    groups, nstate = B.shape[-2], B.shape[-1]
    if groups == 0 or heads % groups != 0:
        raise ValueError(f"{op}: heads ({heads}) must be a multiple of groups ({groups}) in B and C")
    if D is not None and tuple(D.shape) not in ((heads,), (heads, head_dim)):
        raise ValueError(
            f"{op}: D must have shape (heads,) = ({heads},) or (heads, head_dim) = "
            f"({heads}, {head_dim}); got {tuple(D.shape)}"
        )
    if dt_bias is not None and tuple(dt_bias.shape) != (heads,):
        raise ValueError(f"{op}: dt_bias must have shape (heads,) = ({heads},); got {tuple(dt_bias.shape)}")
    want = (x.shape[0], heads, head_dim, nstate)
    if state is not None and tuple(state.shape) != want:
        name = "state" if step else "initial_state"
        raise ValueError(
            f"{op}: {name} must have shape (batch, heads, head_dim, state) = {want}; got {tuple(state.shape)}"
        )
    if bool((A > 0).any()):
        raise ValueError(f"{op}: A must be <= 0 (a decay; pass A = -exp(A_log), not A_log)")


def _discretize_dt(dt, dt_bias, dt_softplus: bool, dt_limit, dtype) -> torch.Tensor:
    """``dt' = clamp(softplus?(dt + dt_bias), *dt_limit)`` in ``dtype``.

    As in mamba, the default limit ``(0, inf)`` means no clamp at all (not a clamp at 0).
    """
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair (min, max) of floats; got {dt_limit!r}") from None
    if not lo <= hi:
        raise ValueError(f"dt_limit must satisfy min <= max; got {dt_limit!r}")
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    if (lo, hi) != _NO_LIMIT:
        dt = dt.clamp(lo, hi)
    return dt


def _skip(x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``D * x`` for x ``(..., heads, head_dim)`` and D ``(heads,)`` or ``(heads, head_dim)``."""
    D = D.to(x.dtype)
    return x * (D[:, None] if D.dim() == 1 else D)


# ----------------------------------------------------------------------------- reference


def _step(x, dt, A, B, C, state, D):
    """One exact recurrence step in the compute dtype; x ``(b, h, p)``, dt ``(b, h)``,
    B/C ``(b, g, n)``, state ``(b, h, p, n)``."""
    rep = x.shape[1] // B.shape[1]
    Bh, Ch = B.repeat_interleave(rep, dim=1), C.repeat_interleave(rep, dim=1)  # (b, h, n)
    decay = torch.exp(dt * A)[..., None, None]
    state = state * decay + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + _skip(x, D)
    return y, state


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the SSD recurrence by one token (decoding).

    Args:
        x: ``(batch, heads, head_dim)``.
        dt: ``(batch, heads)``, before ``dt_bias`` / softplus / ``dt_limit``.
        A: ``(heads,)``, ``<= 0``.
        B, C: ``(batch, groups, state)``.
        state: ``(batch, heads, head_dim, state)``; not modified.
        D, dt_bias, dt_softplus, dt_limit: as in ``ssd``.

    Returns:
        y ``(batch, heads, head_dim)`` in x's dtype and the new state
        ``(batch, heads, head_dim, state)`` in fp32 (fp64 for fp64 x).
    """
    _check_inputs("ssd_step", x, dt, A, B, C, D, dt_bias, state, step=True)
    cd = _compute_dtype(x)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    y, state = _step(x.to(cd), dt, A.to(cd), B.to(cd), C.to(cd), state.to(cd), D)
    return y.to(x.dtype), state


def ssd_ref(
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
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence as a Python loop over time: the exact reference for ``ssd``.

    Same arguments and results as ``ssd`` (``chunk_size`` is accepted and ignored).
    O(time) sequential steps; for tests and short inputs.
    """
    _check_inputs("ssd_ref", x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    cd = _compute_dtype(x)
    batch, time, heads, head_dim = x.shape
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    xc, Ac, Bc, Cc = x.to(cd), A.to(cd), B.to(cd), C.to(cd)
    if initial_state is None:
        state = x.new_zeros(batch, heads, head_dim, B.shape[-1], dtype=cd)
    else:
        state = initial_state.to(cd)
    ys = []
    for t in range(time):
        y, state = _step(xc[:, t], dt[:, t], Ac, Bc[:, t], Cc[:, t], state, D)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else xc * 0
    return y.to(x.dtype), state


# ----------------------------------------------------------------------------- chunked


# exp() of a log-decay below this would be subnormal or underflow to 0, which x86 CPUs
# compute ~10-30x slower than normal numbers; such decays are floored at exp(-60) ~ 1e-26
# (relative to a chunk's own terms of size ~1 this is far below fp32 resolution).
_LOG_DECAY_FLOOR = -60.0


def _segsum_t(a: torch.Tensor) -> torch.Tensor:
    """``(..., Q) -> (..., Q, Q)``, transposed segment sums: ``out[j, i] = a[j+1] + ... + a[i]``
    for ``i > j``, and 0 for ``i <= j``.

    Summed directly per pair (a masked cumsum along the contiguous axis) rather than as
    ``cumsum[i] - cumsum[j]``, which loses precision when the cumulative sums are large.
    """
    Q = a.shape[-1]
    later = torch.ones(Q, Q, dtype=a.dtype, device=a.device).triu(diagonal=1)  # [j, i] = i > j
    return (a[..., None, :] * later).cumsum(dim=-1)


def ssd(
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
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (Mamba-2).

    Args:
        x: ``(batch, time, heads, head_dim)``.
        dt: ``(batch, time, heads)`` step sizes before bias / softplus / limit.
        A: ``(heads,)``, ``<= 0`` (one scalar decay rate per head, e.g. ``-exp(A_log)``).
        B, C: ``(batch, time, groups, state)``, ``heads % groups == 0``; head ``h`` uses
            group ``h // (heads // groups)``.
        D: optional skip ``(heads,)`` or ``(heads, head_dim)``: adds ``D * x``.
        dt_bias: optional ``(heads,)`` added to dt.
        dt_softplus: apply softplus after the bias.
        dt_limit: ``(min, max)`` clamp of the discretised dt; the default ``(0, inf)`` does
            not clamp.
        initial_state: optional ``(batch, heads, head_dim, state)``, zeros by default.
        chunk_size: time steps per chunk (any length works; the last chunk is padded with
            steps of dt = 0, which neither decay nor add to the state).  64 is fastest on
            CPU: the intra-chunk matmuls grow with it, the state matmuls do not.

    Decays are floored at ``exp(-60)`` per chunk segment (subnormal ``exp`` is ~20x slower
    on CPU); the difference from exact is below fp32 resolution of any non-decayed term.

    Returns:
        y ``(batch, time, heads, head_dim)`` in x's dtype and final_state
        ``(batch, heads, head_dim, state)``, both computed in fp32 (fp64 for fp64 x) and
        differentiable in every tensor input.
    """
    _check_inputs("ssd", x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int; got {chunk_size!r}")
    cd = _compute_dtype(x)
    batch, time, heads, head_dim = x.shape
    groups, nstate = B.shape[2], B.shape[3]
    rep = heads // groups
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    if initial_state is None:
        h0 = x.new_zeros(batch, heads, head_dim, nstate, dtype=cd)
    else:
        h0 = initial_state.to(cd)
    if time == 0:
        return x * 0 + (dt.sum() + A.sum() + B.sum() + C.sum()) * 0, h0 * 1

    Q = min(chunk_size, time)
    nc = -(-time // Q)
    pad = nc * Q - time
    xdt = x.to(cd) * dt[..., None]
    Bc, Cc = B.to(cd), C.to(cd)
    if pad:
        # Padding after discretisation: dt' = 0 exactly (no decay, no input).
        dt = torch.nn.functional.pad(dt, (0, 0, 0, pad))
        xdt = torch.nn.functional.pad(xdt, (0, 0, 0, 0, 0, pad))
        Bc = torch.nn.functional.pad(Bc, (0, 0, 0, 0, 0, pad))
        Cc = torch.nn.functional.pad(Cc, (0, 0, 0, 0, 0, pad))
    # Chunked views, grouped heads kept together: (b, g, c, Q, ...).
    Bc = Bc.view(batch, nc, Q, groups, nstate).permute(0, 3, 1, 2, 4)
    Cc = Cc.view(batch, nc, Q, groups, nstate).permute(0, 3, 1, 2, 4)
    xdt = xdt.view(batch, nc, Q, groups, rep, head_dim)

    a = (dt * A.to(cd)).view(batch, nc, Q, groups, rep).permute(0, 3, 4, 1, 2)  # (b, g, r, c, Q)
    # Everything intra-chunk is built transposed, [source j, target i], so the cumsums run
    # along the contiguous axis; matmuls read the transposes for free.
    seg_t = _segsum_t(a)  # (b, g, r, c, Q, Q): log-decay from after step j to step i
    L_t = torch.exp(seg_t.clamp_min(_LOG_DECAY_FLOOR))  # 1 where i <= j; masked below
    decay_out = L_t[..., :, -1]  # step j -> chunk end, (b, g, r, c, Q)
    decay_in = torch.exp(a.cumsum(dim=-1).clamp_min(_LOG_DECAY_FLOOR))  # chunk start -> step i
    decay_chunk = decay_in[..., -1]  # (b, g, r, c)

    # 1. Intra-chunk outputs: ((C B^T) * L) @ (dt x) per head, with the causal mask on the
    #    per-group (B C^T) rather than on the per-head decays.
    causal_t = torch.ones(Q, Q, dtype=cd, device=x.device).triu()  # [j, i] = j <= i
    scores_t = (Bc @ Cc.transpose(-1, -2)) * causal_t  # (b, g, c, Q_j, Q_i)
    x_heads = xdt.permute(0, 3, 4, 1, 2, 5)  # (b, g, r, c, Q, p)
    y_diag = (L_t * scores_t.unsqueeze(2)).transpose(-1, -2) @ x_heads  # (b, g, r, c, Q, p)

    # 2. Each chunk's state contribution at its end, heads of a group side by side:
    #    (n, Q) @ (Q, r * p) -> (b, g, c, n, r * p).
    xs = xdt * decay_out.permute(0, 3, 4, 1, 2).unsqueeze(-1)  # (b, c, Q, g, r, p)
    xs = xs.permute(0, 3, 1, 2, 4, 5).reshape(batch, groups, nc, Q, rep * head_dim)
    chunk_states = Bc.transpose(-1, -2) @ xs

    # 3. Recurrence over chunks in the same (b, g, c, n, r * p) layout.  unbind, not
    #    indexing: its backward is one stack instead of a full-size zero tensor per chunk.
    state = h0.view(batch, groups, rep, head_dim, nstate).permute(0, 1, 4, 2, 3)
    state = state.reshape(batch, groups, nstate, rep * head_dim)
    carry = decay_chunk.permute(0, 1, 3, 2)[..., None].expand(-1, -1, -1, -1, head_dim)
    carry = carry.reshape(batch, groups, nc, 1, rep * head_dim)
    entering = []
    for carry_c, add_c in zip(carry.unbind(2), chunk_states.unbind(2)):
        entering.append(state)
        state = torch.addcmul(add_c, state, carry_c)
    entering = torch.stack(entering, dim=2)  # (b, g, c, n, r * p)
    final = state.view(batch, groups, nstate, rep, head_dim).permute(0, 1, 3, 4, 2)
    final = final.reshape(batch, heads, head_dim, nstate)

    # 4. Entering state -> outputs: (Q, n) @ (n, r * p), times the decay so far.
    y_off = (Cc @ entering).view(batch, groups, nc, Q, rep, head_dim)
    y_off = y_off * decay_in.permute(0, 1, 3, 4, 2).unsqueeze(-1)  # (b, g, c, Q, r, p)

    y = y_off + y_diag.permute(0, 1, 3, 4, 2, 5)  # (b, g, c, Q, r, p)
    y = y.permute(0, 2, 3, 1, 4, 5).reshape(batch, nc * Q, heads, head_dim)[:, :time]
    if D is not None:
        y = y + _skip(x.to(cd), D)
    return y.to(x.dtype), final

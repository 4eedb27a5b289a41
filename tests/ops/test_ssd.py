import math

import pytest
import torch

from longctx.ops.ssd import ssd, ssd_ref, ssd_step

HEADS, HEAD_DIM, STATE = 4, 8, 16


def _inputs(batch, time, groups, *, softplus=False, bias=False, D=None, init=False, seed=0):
    """Realistic Mamba-2 values: A = -exp(U(log 1, log 16)), dt' = softplus(randn - 3)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float()

    raw = randn(batch, time, HEADS) - 3
    kw = {"dt_softplus": softplus}
    args = {
        "x": randn(batch, time, HEADS, HEAD_DIM),
        "dt": raw if softplus else torch.nn.functional.softplus(raw),
        "A": -torch.exp(torch.rand(HEADS, generator=g, dtype=torch.float64) * math.log(16)).float(),
        "B": randn(batch, time, groups, STATE),
        "C": randn(batch, time, groups, STATE),
    }
    if bias:
        kw["dt_bias"] = 0.5 * randn(HEADS)
    if D == "heads":
        kw["D"] = randn(HEADS)
    elif D == "channels":
        kw["D"] = randn(HEADS, HEAD_DIM)
    if init:
        kw["initial_state"] = randn(batch, HEADS, HEAD_DIM, STATE)
    return args, kw


def _run(fn, args, kw, dtype, seed=1, **extra):
    """Outputs and the gradients of every tensor input under a random linear loss."""
    leaves = {k: v.to(dtype).requires_grad_() for k, v in {**args, **kw}.items() if torch.is_tensor(v)}
    flags = {k: v for k, v in kw.items() if not torch.is_tensor(v)}
    y, final = fn(**{k: leaves[k] for k in args}, **{k: leaves[k] for k in kw if k in leaves}, **flags, **extra)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"y": y, "final_state": final, **{f"d_{k}": d for k, d in zip(leaves, grads)}}


def _close(fast, ref, tol=2e-5):
    assert fast.keys() == ref.keys()
    for name in ref:
        a, b = fast[name].double(), ref[name]
        assert torch.isfinite(a).all(), name
        # Relative to the tensor's scale: gradients of A and dt_bias sum over many terms.
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol * 10, msg=lambda m: f"{name}: {m}")


CONFIGS = [
    dict(groups=1),
    dict(groups=2, D="heads", init=True),
    dict(groups=1, softplus=True, bias=True, D="channels"),
    dict(groups=2, softplus=True, bias=True, D="heads", init=True),
]


@pytest.mark.parametrize("time,chunk", [(1, 64), (7, 3), (7, 64), (63, 16), (257, 64), (257, 100)])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_ssd_matches_reference(time, chunk, cfg):
    c = dict(CONFIGS[cfg])
    args, kw = _inputs(2, time, c.pop("groups"), **c)
    fast = _run(ssd, args, kw, torch.float32, chunk_size=chunk)
    ref = _run(ssd_ref, args, kw, torch.float64)
    assert fast["y"].dtype == torch.float32 and fast["final_state"].dtype == torch.float32
    _close(fast, ref)


@pytest.mark.parametrize("dt_limit", [(0.02, 0.1), (0.0, 0.03)])
def test_dt_limit_and_padding(dt_limit):
    """A positive lower limit must not leak into the padded steps of the last chunk."""
    args, kw = _inputs(1, 37, 1, softplus=True, bias=True, D="heads", init=True)
    kw["dt_limit"] = dt_limit
    _close(_run(ssd, args, kw, torch.float32, chunk_size=16), _run(ssd_ref, args, kw, torch.float64))


def test_strong_decay_stays_finite_and_exact():
    """Decays that underflow in fp32 (dt * A down to -400 per step) neither nan nor drift."""
    args, kw = _inputs(1, 50, 1, init=True)
    args["dt"] = args["dt"] * 0 + torch.linspace(0.01, 25.0, 50)[None, :, None]
    args["A"] = torch.full((HEADS,), -16.0)
    fast = _run(ssd, args, kw, torch.float32, chunk_size=32)
    _close(fast, _run(ssd_ref, args, kw, torch.float64))


def _misses(actual, expected, tol=1e-5):
    """How many times over ``assert_close(actual, expected, atol=tol, rtol=tol)``'s tolerance."""
    return ((actual - expected).abs() / (tol + tol * expected.abs())).max().item()


def test_step_by_step_equals_scan():
    """ssd_step token after token equals the chunked scan; the state it carries matters: the
    same steps from a zero start state miss by >= 100x the tolerance."""
    args, kw = _inputs(2, 23, 2, softplus=True, bias=True, D="channels", init=True)
    y, final = ssd(**args, **kw, chunk_size=8)
    start = kw.pop("initial_state")

    def steps(state):
        ys = []
        for t in range(23):
            y_t, state = ssd_step(
                args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t], args["C"][:, t], state, **kw
            )
            ys.append(y_t)
        return torch.stack(ys, 1), state

    y_steps, state = steps(start)
    torch.testing.assert_close(y_steps, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)
    assert _misses(steps(torch.zeros_like(start))[0], y) >= 100


@pytest.mark.parametrize("cuts", [[1], [5, 6, 40], [16, 32], [70]])
def test_split_and_chain_equals_one_pass(cuts):
    """Pieces chained final state -> initial state equal one pass; the carried state matters:
    pieces after the first started from zeros miss by >= 100x the tolerance."""
    args, kw = _inputs(2, 71, 2, softplus=True, bias=True, D="heads", init=True)
    y, final = ssd(**args, **kw, chunk_size=16)
    start = kw.pop("initial_state")

    def chain(carry):
        state, ys = start, []
        for lo, hi in zip([0, *cuts], [*cuts, 71]):
            part = {k: v if k == "A" else v[:, lo:hi] for k, v in args.items()}
            y_part, state = ssd(**part, **kw, initial_state=state, chunk_size=16)
            ys.append(y_part)
            state = carry(state)
        return torch.cat(ys, 1), state

    y_chain, state = chain(lambda s: s)
    torch.testing.assert_close(y_chain, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)
    assert _misses(chain(torch.zeros_like)[0], y) >= 100


def test_dtypes_and_empty_sequence():
    args, kw = _inputs(1, 9, 1, init=True)
    y, final = ssd(**{k: v.double() for k, v in args.items()}, initial_state=kw["initial_state"].double())
    assert y.dtype == final.dtype == torch.float64
    half = {k: v.bfloat16() if k == "x" else v for k, v in args.items()}
    y, final = ssd(**half)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    empty = {k: v if k == "A" else v[:, :0] for k, v in args.items()}
    y, final = ssd(**empty, **kw)
    assert y.shape == (1, 0, HEADS, HEAD_DIM)
    torch.testing.assert_close(final, kw["initial_state"])


_B, _T, _G = 2, 5, 2
BAD = {
    # argument: (replacement, expected message)
    "x": (torch.zeros(_B, _T, HEADS * HEAD_DIM), "x must have shape"),
    "dt": (torch.zeros(_B, _T, HEADS + 1), "dt must have shape"),
    "A": (torch.zeros(HEADS, 1), "A must have shape"),
    "B": (torch.zeros(_B, _T + 1, _G, STATE), "B must have shape"),
    "C": (torch.zeros(_B, _T, _G, STATE + 1), "C must have the shape of B"),
    "D": (torch.zeros(HEADS, HEAD_DIM + 1), "D must have shape"),
    "dt_bias": (torch.zeros(HEADS + 1), "dt_bias must have shape"),
    "initial_state": (torch.zeros(_B, HEADS, STATE, HEAD_DIM), "initial_state must have shape"),
    "dt_limit": ((1.0, 0.5), "dt_limit"),
    "chunk_size": (0, "chunk_size"),
}


@pytest.mark.parametrize("name", [*BAD, "groups", "A_log"])
def test_bad_arguments_raise(name):
    args, kw = _inputs(_B, _T, _G)
    if name == "groups":
        args["B"], args["C"], match = torch.zeros(_B, _T, 3, STATE), torch.zeros(_B, _T, 3, STATE), "multiple of groups"
    elif name == "A_log":
        args["A"], match = -args["A"], r"A must be <= 0 \(a decay; pass A = -exp\(A_log\)"
    else:
        value, match = BAD[name]
        (args if name in args else kw)[name] = value
    with pytest.raises(ValueError, match=match):
        ssd(**args, **kw)
    if name != "chunk_size":  # the reference ignores chunk_size
        with pytest.raises(ValueError, match=match):
            ssd_ref(**args, **kw)


def test_step_bad_state_raises():
    args, _ = _inputs(2, 1, 1)
    step = {k: v if k == "A" else v[:, 0] for k, v in args.items()}
    with pytest.raises(ValueError, match="state must have shape"):
        ssd_step(**step, state=torch.zeros(2, HEADS, HEAD_DIM, STATE + 1))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, heads, head_dim\)"):
        ssd_step(**{**step, "x": args["x"]}, state=torch.zeros(2, HEADS, HEAD_DIM, STATE))

"""selective_scan (numba kernel on CPU) against selective_scan_ref in fp64; ssm_step; pieces.

The fast path runs in fp32; the reference gets fp64 copies of the same fp32 inputs, so the
comparison measures the kernel's own error.  Value ranges follow Mamba's init:
A = -exp(A_log), A_log = log(1..N); delta = softplus(randn - 4) (dt ~ 0.001..0.1) plus some
larger steps.  The numba kernels compile once per machine (cached on disk), ~15-20 s.
"""

import numpy
import pytest
import torch

from longctx.ops import numba_math
from longctx.ops.scan import autograd, chunked, kernels, selective_scan, selective_scan_ref, ssm_step

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(batch=2, time=7, channels=40, state=16, groups=1, *, D=True, z=True, bias=True, softplus=True,
            init=True, seed=0):
    """fp32 inputs (None for the absent ones), in the order of NAMES."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -torch.arange(1, state + 1.0).repeat(channels, 1) * torch.exp(0.1 * r(channels, state))
    raw = r(batch, time, channels) - 4
    big = torch.rand(batch, time, channels, generator=g) < 0.1
    raw = torch.where(big, 1.5 * torch.rand(batch, time, channels, generator=g) - 0.5, raw)  # dt up to ~1
    bias_ = 0.5 * r(channels) if bias else None
    if softplus:
        delta = raw
    else:  # delta is used as given (plus the bias): keep it positive
        delta = torch.nn.functional.softplus(raw) - (0 if bias_ is None else bias_.clamp(max=0))
    bc = (batch, time, state) if groups == 1 else (batch, time, groups, state)
    return [
        r(batch, time, channels), delta, A, r(*bc), r(*bc),
        r(channels) if D else None, r(batch, time, channels) if z else None, bias_,
        0.5 * r(batch, channels, state) if init else None,
    ]


def _run(fn, xs, softplus, seed=1):
    """(y, final_state, gradients of every given input) for a random linear loss on y and final_state."""
    xs = [None if x is None else x.clone().requires_grad_() for x in xs]
    y, h = fn(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=softplus, initial_state=xs[8])
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g).to(y.dtype)).sum()
    loss = loss + (h * torch.randn(h.shape, generator=g).to(h.dtype)).sum()
    given = [x for x in xs if x is not None]
    grads = iter(torch.autograd.grad(loss, given))
    return y, h, [None if x is None else next(grads) for x in xs]


def _close(a, b, what, rtol=1e-5):
    """a (fp32) vs b (fp64 reference): elementwise rtol, plus an absolute floor of rtol x max|b|."""
    assert a.shape == b.shape, what
    torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * max(b.abs().max().item(), 1e-30),
                               msg=lambda m: f"{what}: {m}")


def _compare(xs, softplus):
    fast = _run(selective_scan, xs, softplus)
    ref = _run(selective_scan_ref, [None if x is None else x.double() for x in xs], softplus)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    _close(fast[0], ref[0], "y")
    _close(fast[1], ref[1], "final_state")
    for name, a, b in zip(NAMES, fast[2], ref[2]):
        assert (a is None) == (b is None), name
        if a is not None:
            _close(a, b, f"grad {name}")


# Each combination turns options on and off; together they cover every one both ways.
COMBOS = [
    dict(D=False, z=False, bias=False, softplus=False, init=False, groups=1),
    dict(D=True, z=True, bias=True, softplus=True, init=True, groups=2),
    dict(D=True, z=False, bias=True, softplus=False, init=True, groups=1),
    dict(D=False, z=True, bias=False, softplus=True, init=False, groups=2),
    dict(D=True, z=True, bias=True, softplus=True, init=False, groups=1),
]


@pytest.mark.parametrize("time", [1, 7, 63, 257])
@pytest.mark.parametrize("combo", range(len(COMBOS)))
def test_fast_matches_reference(time, combo):
    kw = dict(COMBOS[combo])
    groups = kw.pop("groups")
    _compare(_inputs(time=time, groups=groups, seed=time + combo, **kw), kw["softplus"])


@pytest.mark.parametrize("channels,groups", [(7, 1), (160, 2), (1536, 1)])
def test_channel_blocks(channels, groups):
    """Odd widths (scalar remainders), several blocks per group, and a real model width."""
    _compare(_inputs(batch=1, time=33, channels=channels, groups=groups, seed=channels), True)


def test_kernel_elementwise_functions_are_accurate_to_a_few_ulp():
    """The kernel's own softplus (exp + polynomial log1p) and silu against fp64, in units in
    the last place of the fp32 result, over the range where results are normal numbers."""
    x = torch.linspace(-80.0, 80.0, 4001, dtype=torch.float32)
    for name, fn, ref in (("softplus", numba_math.softplus, torch.nn.functional.softplus),
                          ("silu", numba_math.silu, torch.nn.functional.silu)):
        got = torch.tensor([fn(v) for v in x.numpy()], dtype=torch.float64)  # numpy fp32 scalars
        want = ref(x.double())
        normal = want.abs() > torch.finfo(torch.float32).tiny
        ulp = torch.from_numpy(numpy.spacing(want.float().abs().numpy())).double()
        err = ((got - want).abs() / ulp)[normal].max().item()
        assert err <= 3.0, f"{name}: {err:.2f} ulp"


def test_exp_keeps_its_accuracy_inlined_into_a_fast_math_loop():
    """The decode kernels call exp in vectorised fast-math loops, where LLVM may reassociate
    around it: a rounding written as (x + M) - M would cancel to x (errors of 30%)."""
    import numba

    @numba.njit(fastmath=True)
    def exps(x, out):
        for i in range(x.shape[0]):
            out[i] = numba_math.exp(x[i])

    x = torch.linspace(-80.0, 80.0, 40001, dtype=torch.float32).numpy()
    got = numpy.empty_like(x)
    exps(x, got)
    want = numpy.exp(x.astype(numpy.float64))
    ulp = numpy.spacing(want.astype(numpy.float32))
    assert (numpy.abs(got - want) / ulp).max() <= 3.0


def test_decays_beyond_the_fast_range_and_non_finite_inputs():
    """The kernel's unclamped _decay runs only for chunks (16 steps) x 16 channels whose
    exponents |delta' A log2 e| stay <= 125; elsewhere the clamping exp2 (underflow to 0).
    Both in one scan, values and gradients; NaN and inf in delta spread as in the reference."""
    xs = _inputs(batch=1, time=70, channels=40, seed=12)
    xs[2] = xs[2].clone()
    xs[2][3] *= 40.0  # channel 3: |A| up to ~900, so exponents beyond 125 at delta' > ~0.1
    xs[1] = xs[1].clone()
    xs[1][:, 20:30, 17:19] += 8.0  # delta' ~ 8 in one chunk: exponents up to ~200 for channels 17-18
    _compare(xs, True)
    u, delta, A, B, C = [x.clone() for x in xs[:5]]
    delta[0, 40, 5], delta[0, 50, 9], A[30, 2] = float("nan"), float("inf"), float("-inf")
    y, h = selective_scan(u, delta, A, B, C, delta_softplus=True)
    y_ref, h_ref = selective_scan_ref(u.double(), delta.double(), A.double(), B.double(), C.double(),
                                      delta_softplus=True)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(h.isnan(), h_ref.isnan())
    assert y.isnan().any() and not y[:, :, :5].isnan().any()
    finite = ~y_ref.isnan()
    _close(y[finite], y_ref[finite], "finite part of y")


def test_step_by_step_equals_scan():
    xs = _inputs(time=9, groups=2, seed=3)
    u, delta, A, B, C, D, z, bias, h = xs
    y, h_final = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, initial_state=h)
    ys = []
    for t in range(u.shape[1]):
        y_t, h = ssm_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], h, D=D, z=z[:, t], delta_bias=bias,
                          delta_softplus=True)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_final, rtol=1e-5, atol=1e-5)


def _loop(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """The recurrence written out from the paper's equations, one time step after another, in
    fp64 (independent of selective_scan_ref and ssm_step): per channel c,
    dt = softplus(delta + bias), h_t = exp(dt A) h_{t-1} + dt B_t u_t, y_t = (C_t . h_t + D u_t)
    silu(z_t), with the B and C of group c // (channels / groups)."""
    assert delta_softplus, "the loop writes out Mamba's softplus step"
    u, delta, A, B, C, D, z, bias, h = (x.double() for x in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    group = torch.arange(u.shape[-1]) // (u.shape[-1] // B.shape[-2])
    ys = []
    for t in range(u.shape[1]):
        dt = torch.log1p(torch.exp(delta[:, t] + bias))
        h = torch.exp(dt[..., None] * A) * h + (dt * u[:, t])[..., None] * B[:, t, group]
        y = (C[:, t, group] * h).sum(-1) + D * u[:, t]
        ys.append(y * z[:, t] * torch.sigmoid(z[:, t]))
    return torch.stack(ys, 1), h


def _steps(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """ssm_step token after token, the state carried."""
    h, ys = initial_state, []
    for t in range(u.shape[1]):
        y, h = ssm_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], h, D=D, z=z[:, t], delta_bias=delta_bias,
                        delta_softplus=delta_softplus)
        ys.append(y)
    return torch.stack(ys, 1), h


def test_steps_match_an_independent_loop():
    """ssm_step in fp32, over 4 tokens from a random state, against _loop in fp64: outputs, final
    state and every input's gradient.  The initial state matters: the loop started from zeros
    misses y by >= 100x _close's tolerance."""
    xs = _inputs(time=4, groups=2, seed=4)
    fast = _run(_steps, xs, True)
    ref = _run(_loop, [x.double() for x in xs], True)
    _close(fast[0], ref[0], "y")
    _close(fast[1], ref[1], "final state")
    for name, a, b in zip(NAMES, fast[2], ref[2]):
        _close(a, b, f"grad {name}")
    y = ref[0].detach()
    zero_start = _loop(*xs[:8], torch.zeros_like(xs[8]), True)[0]
    assert ((zero_start - y).abs() / (1e-5 * y.abs().max() + 1e-5 * y.abs())).max() >= 100


@pytest.mark.parametrize("split", [0, 1, 16, 31, 40])
def test_pieces_equal_one_scan(split):
    """Scanning [0, split) and then [split, T) with final_state -> initial_state equals one
    scan: outputs, final state and all gradients (through the state hand-over)."""
    xs = _inputs(time=40, groups=2, seed=5)

    def pieces(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        kw = dict(D=D, delta_bias=delta_bias, delta_softplus=delta_softplus)
        y1, h = selective_scan(u[:, :split], delta[:, :split], A, B[:, :split], C[:, :split], z=z[:, :split],
                               initial_state=initial_state, **kw)
        y2, h = selective_scan(u[:, split:], delta[:, split:], A, B[:, split:], C[:, split:], z=z[:, split:],
                               initial_state=h, **kw)
        return torch.cat([y1, y2], 1), h

    whole = _run(selective_scan, xs, True)
    split_run = _run(lambda *a, **k: pieces(*a, k["D"], k["z"], k["delta_bias"], k["delta_softplus"],
                                            k["initial_state"]), xs, True)
    for a, b in zip(whole[:2] + tuple(whole[2]), split_run[:2] + tuple(split_run[2])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_path_for_other_devices_matches_reference():
    """Non-CPU inputs take the chunked torch scan; check it on CPU with chunks that split the sequence."""
    xs = _inputs(time=45, groups=2, seed=6)
    fn = lambda *a, **k: chunked.scan_chunked(*a, chunk=16, **k)  # noqa: E731
    fast = _run(fn, xs, True)
    ref = _run(selective_scan_ref, [x.double() for x in xs], True)
    _close(fast[0], ref[0], "y")
    _close(fast[1], ref[1], "final_state")
    for name, a, b in zip(NAMES, fast[2], ref[2]):
        _close(a, b, f"grad {name}")


def test_non_cpu_device_uses_torch_path(monkeypatch):
    def no_kernel(*a, **k):
        raise AssertionError("numba kernel called for a non-CPU device")

    monkeypatch.setattr(autograd, "_numba_forward", no_kernel)
    xs = [None if x is None else x.to("meta") for x in _inputs(time=5)]
    y, h = selective_scan(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True, initial_state=xs[8])
    assert y.shape == xs[0].shape and y.device.type == "meta" and h.shape == xs[8].shape


def test_no_grad_path_equals_grad_path_and_backward_is_deterministic():
    xs = _inputs(time=50, groups=2, seed=7)
    with torch.no_grad():
        y0, h0 = selective_scan(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True,
                                initial_state=xs[8])
    a, b = _run(selective_scan, xs, True), _run(selective_scan, xs, True)
    assert torch.equal(y0, a[0]) and torch.equal(h0, a[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_training_memory_has_no_time_x_channels_x_state_tensor():
    """What autograd keeps: the inputs plus a state every _CKPT steps, nothing (B, T, C, N)."""
    batch, time, channels, state = 1, 512, 64, 16
    xs = [None if x is None else x.requires_grad_() for x in _inputs(batch, time, channels, state, seed=8)]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True, initial_state=xs[8])
    inputs = sum(x.numel() for x in xs if x is not None)
    checkpoints = batch * time * channels * state // kernels.CKPT
    assert sum(saved) <= inputs + checkpoints
    assert max(saved) < batch * time * channels * state


def test_dtypes():
    xs = _inputs(time=5, seed=9)
    y, h = selective_scan(*[x.bfloat16() for x in xs[:5]], D=xs[5], z=xs[6].bfloat16(), delta_bias=xs[7],
                          delta_softplus=True, initial_state=xs[8])
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y64, h64 = selective_scan(*[x.double() for x in xs[:5]], delta_softplus=True)
    assert y64.dtype == torch.float64 and h64.dtype == torch.float32
    y32, _ = selective_scan(*xs[:5], delta_softplus=True)
    torch.testing.assert_close(y64.float(), y32, rtol=1e-6, atol=1e-6)


def test_empty_sequence_passes_the_state_through():
    u, delta, A, B, C, D, z, bias, h = _inputs(time=0, seed=10)
    y, h_out = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, initial_state=h)
    assert y.shape == (2, 0, 40)
    torch.testing.assert_close(h_out, h)


def _err(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        selective_scan(*args, **kwargs)


def test_bad_shapes_and_dtypes_raise_clear_errors():
    u, delta, A, B, C, D, z, bias, h = _inputs(time=5, groups=2, seed=11)
    _err(r"u must have shape \(batch, time, channels\)", u[0], delta[0], A, B[0], C[0])
    _err(r"delta must have shape .*\(2, 5, 40\)", u, delta[:, :4], A, B, C)
    _err(r"z must have shape", u, delta, A, B, C, z=z[..., :3])
    _err(r"A must have shape \(channels, state\) = \(40, state\)", u, delta, A[:30], B, C)
    _err(r"B must have shape .*state = 16", u, delta, A, B[..., :8], C)
    _err(r"C must have shape", u, delta, A, B, C[:, :3])
    _err(r"B and C must have the same shape", u, delta, A, B, C[:, :, :1])
    _err(r"multiple of the groups", u, delta, A, torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16))
    _err(r"D must have shape \(channels,\) = \(40,\)", u, delta, A, B, C, D=D[:3])
    _err(r"delta_bias must have shape \(channels,\)", u, delta, A, B, C, delta_bias=bias[None])
    _err(r"initial_state must have shape \(batch, channels, state\) = \(2, 40, 16\)", u, delta, A, B, C,
         initial_state=h[:, :, :4])
    _err(r"u must have a floating dtype", u.long(), delta, A, B, C)
    _err(r"A is on meta but u is on cpu", u, delta, A.to("meta"), B, C)
    _err(r"B must be a torch.Tensor", u, delta, A, B.tolist(), C)
    with pytest.raises(ValueError, match=r"ssm_step: state must have shape \(batch, channels, state\)"):
        ssm_step(u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], h[:1])
    with pytest.raises(ValueError, match=r"ssm_step: u must have shape \(batch, channels\)"):
        ssm_step(u, delta, A, B, C, h)


def test_the_cpu_kernel_leaves_torch_thread_count_alone():
    """numba's OpenMP layer shares the thread count with torch; the kernel must restore torch's."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        u = torch.randn(1, 40, 32)
        selective_scan(u, torch.rand(1, 40, 32), -torch.rand(32, 4), torch.randn(1, 40, 4), torch.randn(1, 40, 4))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)

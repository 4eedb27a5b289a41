"""mamba_decode_step (fused numba kernel) against mamba_decode_step_ref (torch ops)."""

import pytest
import torch

import longctx.ops.mamba_decode as md
from longctx.ops.mamba_decode import mamba_decode_step, mamba_decode_step_ref


def _args(batch=2, channels=40, state=16, dt_rank=5, kernel=4, conv_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        xz=r(batch, 2 * channels), conv_state=r(batch, channels, kernel - 1),
        conv_weight=0.5 * r(channels, 1, kernel), conv_bias=r(channels) if conv_bias else None,
        x_proj_weight=0.3 * r(dt_rank + 2 * state, channels), dt_proj_weight=0.5 * r(channels, dt_rank),
        dt_bias=r(channels) - 3, A_log=torch.log(torch.arange(1, state + 1.0)).repeat(channels, 1) + 0.1 * r(channels, state),
        D=r(channels), ssm_state=r(batch, channels, state),
    )


@pytest.mark.parametrize("shape", [dict(), dict(batch=1, channels=33, state=7, dt_rank=3, kernel=2),
                                   dict(conv_bias=False), dict(kernel=1)])
def test_fused_step_matches_reference(shape):
    args = _args(**shape)
    with torch.no_grad():
        ref = mamba_decode_step_ref(**args)
        fast = mamba_decode_step(**args)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_inputs_are_not_modified_and_weights_changed_in_place_are_seen():
    args = _args()
    before = {k: None if v is None else v.clone() for k, v in args.items()}
    with torch.no_grad():
        first = mamba_decode_step(**args)
        for k, v in args.items():
            if v is not None:
                assert torch.equal(v, before[k]), k
        args["x_proj_weight"].mul_(2)  # an optimizer step: same storage, new version
        args["A_log"].add_(0.5)
        second = mamba_decode_step(**args)
        ref = mamba_decode_step_ref(**args)
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(second[0], ref[0], rtol=1e-5, atol=1e-5)


def test_gradients_take_the_reference_path():
    args = _args()
    args["x_proj_weight"].requires_grad_()
    y, _, h = mamba_decode_step(**args)
    (y.sum() + h.sum()).backward()
    assert args["x_proj_weight"].grad is not None and args["x_proj_weight"].grad.abs().sum() > 0


def _loop(xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, ssm_state):
    """One token of a Mamba block between in_proj and out_proj, written out from the paper's
    equations (independent of the library's step): x = silu(conv over the tail and the new
    input + bias); (dt, B, C) = x_proj x; dt = softplus(dt_proj dt + dt_bias);
    h = exp(dt A) h + dt B x with A = -exp(A_log); y = (C . h + D x) silu(z)."""
    channels, state = A_log.shape
    x, z = xz[:, :channels], xz[:, channels:]
    window = torch.cat([conv_state, x[:, :, None]], -1)
    x = (window * conv_weight[:, 0]).sum(-1) + conv_bias
    x = x * torch.sigmoid(x)
    proj = x @ x_proj_weight.T
    rank = proj.shape[1] - 2 * state
    B, C = proj[:, rank : rank + state], proj[:, rank + state :]
    dt = torch.log1p(torch.exp(proj[:, :rank] @ dt_proj_weight.T + dt_bias))
    h = torch.exp(dt[..., None] * -torch.exp(A_log)) * ssm_state + (dt * x)[..., None] * B[:, None]
    y = (h * C[:, None]).sum(-1) + D * x
    return y * z * torch.sigmoid(z), window[:, :, 1:], h


def _chain(step, args, tokens):
    """Each token's y through ``step`` with the states carried, and the final conv and SSM states."""
    conv, h, ys = args["conv_state"], args["ssm_state"], []
    for xz in tokens:
        y, conv, h = step(**{**args, "xz": xz, "conv_state": conv, "ssm_state": h})
        ys.append(y)
    return torch.stack(ys), conv, h


# fp64 inputs take the reference path, which (as the layer) computes A = -exp(A_log) in fp32:
# it agrees with the loop to that rounding (~2e-7 here), not to fp64's precision.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_steps_match_an_independent_loop(dtype, tol):
    """The fused step and its torch reference over 4 tokens, states carried, against _loop in
    fp64.  The carried state matters: the loop from a zero SSM state or conv tail misses y by
    >= 100x tol."""
    args = _args(seed=5)
    g = torch.Generator().manual_seed(6)
    tokens = [torch.randn(args["xz"].shape, generator=g) for _ in range(4)]
    args64 = {k: v.double() for k, v in args.items()}
    tokens64 = [t.double() for t in tokens]
    want = _chain(_loop, args64, tokens64)
    with torch.no_grad():
        for step in (mamba_decode_step, mamba_decode_step_ref):
            got = _chain(step, {k: v.to(dtype) for k, v in args.items()}, [t.to(dtype) for t in tokens])
            assert got[0].dtype == dtype
            for name, a, b in zip(("y", "conv_state", "ssm_state"), got, want):
                where = f"{step.__name__} {name}"
                torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f"{where}: {m}")
    for lost in ("conv_state", "ssm_state"):
        y = _chain(_loop, {**args64, lost: torch.zeros_like(args64[lost])}, tokens64)[0]
        assert ((y - want[0]).abs() / (tol + tol * want[0].abs())).max() >= 100, lost


def test_weight_cache_forgets_dead_tensors():
    args = _args(seed=3)
    with torch.no_grad():
        mamba_decode_step(**args)
    key = id(args["x_proj_weight"])
    assert key in md._NUMPY
    del args
    assert key not in md._NUMPY


def test_inference_mode_tensors():
    with torch.inference_mode():
        args = _args(seed=4)
        fast = mamba_decode_step(**args)
        ref = mamba_decode_step_ref(**args)
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-5, atol=1e-5)

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


def test_other_dtypes_take_the_reference_path():
    args = {k: None if v is None else v.double() for k, v in _args().items()}
    with torch.no_grad():
        fast = mamba_decode_step(**args)
        ref = mamba_decode_step_ref(**args)
    assert fast[0].dtype == torch.float64
    torch.testing.assert_close(fast[0], ref[0])


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

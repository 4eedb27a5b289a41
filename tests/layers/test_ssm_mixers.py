"""Mamba and Mamba-2 mixers: recurrent state == full forward, in pieces and one token at a time."""

import subprocess
import sys

import pytest
import torch

from longctx.generation import generate
from longctx.model import LanguageModel, ModelConfig
from longctx.train.checkpoint import save_model_weights
from tests.layers.mixer_state import forget, make_state_matter, misses, run_pieces, state_parts

SMALL = dict(vocab_size=40, d_model=32, n_heads=2, mlp_hidden=0, ssm_state=8, ssm_head_dim=16, ssm_chunk=8)


def _model(layers, **overrides):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(layers=layers, **{**SMALL, **overrides})).eval()


LAYER_SETS = {
    "mamba": ["mamba", "mamba"],
    "mamba2": ["mamba2", "mamba2"],
    "mamba2-groups": ["mamba2"],
    "hybrid": ["mamba", "attention", "mamba2"],
    "mamba-time-invariant": ["mamba", "mamba"],
}
# Piece ends of the 29 tokens.  Every piece after the first starts from the carried state:
# in "prefill" each is a multi-token scan (its initial state), in "decode" each is one token
# (Mamba's fused step, Mamba-2's ssd_step; the time-invariant Mamba scans it), "mixed" goes
# from one to the other and back.
SCHEDULES = {"prefill": (0, 3, 12, 29), "decode": (0, 5, *range(6, 30)), "mixed": (0, 1, 2, 15, *range(16, 30))}
TOL = 1e-4


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(LAYER_SETS))
def test_decode_and_chunked_prefill_match_full_forward(name, schedule):
    """Pieces through a state give the full pass's logits within TOL, and the test can tell:
    with part of any layer's state zeroed before each piece (the SSM state, the conv tail,
    the KV cache), the logits miss by >= 100x TOL (weights from make_state_matter)."""
    extra = {"mamba2-groups": {"ssm_groups": 2}, "mamba-time-invariant": {"ssm_selective": False}}.get(name, {})
    model = make_state_matter(_model(LAYER_SETS[name], **extra))
    ids = torch.randint(0, 40, (2, 29), generator=torch.Generator().manual_seed(1))
    cuts = SCHEDULES[schedule]
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(run_pieces(model, ids, cuts), full, atol=TOL, rtol=TOL)
        for layer, part in state_parts(model):
            miss = misses(run_pieces(model, ids, cuts, forget(layer, part)), full, TOL)
            assert miss >= 100, f"losing layer {layer}'s {part} state moves the logits only {miss:.1f}x TOL"


def test_blocks_without_mlp_and_ssm_init():
    model = _model(["mamba"])
    assert model.blocks[0].mlp is None
    mixer = model.blocks[0].mixer
    torch.testing.assert_close(mixer.A_log[0].exp(), torch.arange(1.0, 9.0))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert getattr(mixer.A_log, "no_weight_decay", False)


@pytest.mark.parametrize("layers", [["mamba", "mamba"], ["mamba2", "attention"]])
def test_fork_save_restore_continue_equals_uninterrupted(tmp_path, layers):
    model = make_state_matter(_model(layers))  # so that a state restored wrong changes the tokens
    prompt = [1, 2, 3]
    whole = generate(model, prompt, 130, temperature=1.0, top_k=20, seed=5)
    state = model.init_state(1)
    first = generate(model, prompt, 100, temperature=1.0, top_k=20, seed=5, state=state)
    model.save_state(state, tmp_path / "s.safetensors")
    restored = model.load_state(tmp_path / "s.safetensors")
    rest = generate(model, torch.empty(1, 0, dtype=torch.long), 30, temperature=1.0, top_k=20, state=restored)
    torch.testing.assert_close(torch.cat([first, rest[:, 0:]], 1), whole, rtol=0, atol=0)


def test_state_restores_in_another_process(tmp_path):
    model = make_state_matter(_model(["mamba", "mamba2"]))
    weights = tmp_path / "w.safetensors"
    save_model_weights(model, weights)
    state = model.init_state(1)
    generate(model, [4, 5, 6], 10, temperature=0, state=state)
    model.save_state(state, tmp_path / "s.safetensors")
    expected = generate(model, torch.empty(1, 0, dtype=torch.long), 8, temperature=0, state=state)
    code = f"""
import torch
from longctx.generation import generate
from longctx.model import LanguageModel, ModelConfig
from longctx.train.checkpoint import load_model_weights
model = LanguageModel(ModelConfig(layers=["mamba", "mamba2"], **{SMALL!r})).eval()
load_model_weights(model, {str(weights)!r})
state = model.load_state({str(tmp_path / 's.safetensors')!r})
print(generate(model, torch.empty(1, 0, dtype=torch.long), 8, temperature=0, state=state).tolist())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(expected.tolist())


def test_state_from_a_different_model_is_refused(tmp_path):
    a, b = _model(["mamba"]), _model(["mamba"], ssm_state=4)
    state = a.init_state(1)
    generate(a, [1, 2], 3, temperature=0, state=state)
    a.save_state(state, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="different model"):
        b.load_state(tmp_path / "s.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="corrupt"):
        a.load_state(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("overrides,match", [
    (dict(layers=["mamba2"], ssm_head_dim=24), "divisible by model.ssm_head_dim"),
    (dict(layers=["mamba2"], ssm_groups=3), "not divisible by model.ssm_groups"),
    (dict(layers=["mamba"], ssm_dt_min=0.5, ssm_dt_max=0.1), "ssm_dt_min"),
    (dict(layers=["mamba"], mlp_hidden=-1), "mlp_hidden"),
])
def test_ssm_config_errors(overrides, match):
    from longctx.model import ConfigError
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**SMALL, **overrides})


def test_state_from_other_weights_is_refused_and_reset_starts_afresh(tmp_path):
    """A state file from other weights is refused; after reset the logits are a fresh
    state's, while the state carried on would miss them by >= 100x TOL."""
    a, b = make_state_matter(_model(["mamba"])), make_state_matter(_model(["mamba"]))
    with torch.no_grad():
        b.blocks[0].mixer.D.add_(0.5)
    state = a.init_state(1)
    generate(a, [1, 2], 3, temperature=0, state=state)
    a.save_state(state, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="different model"):
        b.load_state(tmp_path / "s.safetensors")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        fresh, carried_on = a(ids), a(ids, state)
        state.reset()
        assert state.seq_len == 0 and not state.extra
        torch.testing.assert_close(a(ids, state), fresh, atol=TOL, rtol=TOL)
    assert misses(carried_on, fresh, TOL) >= 100


def test_time_invariant_mamba_has_constant_step_b_c_that_learn():
    """ssm_selective = False: no input-dependent projections; the SSM's step, B and C are
    parameters, and gradients reach them."""
    model = _model(["mamba"], ssm_selective=False).train()
    mixer = model.blocks[0].mixer
    assert not hasattr(mixer, "x_proj") and not hasattr(mixer, "dt_proj")
    assert mixer.B.shape == mixer.C.shape == (8,) and mixer.dt_bias.shape == (64,)
    model(torch.randint(0, 40, (2, 12))).square().mean().backward()
    for p in (mixer.B, mixer.C, mixer.dt_bias, mixer.A_log):
        assert p.grad is not None and p.grad.abs().sum() > 0
    selective = _model(["mamba"])
    assert model.num_parameters() < selective.num_parameters()

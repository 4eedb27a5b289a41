"""The "dilated" mixer: cached decoding equals the full pass, the cache stays bounded, config errors."""

import pytest
import torch

from longctx.generation import generate
from longctx.model import ConfigError, LanguageModel, ModelConfig
from tests.layers.mixer_state import forget, misses, run_pieces, state_parts

SMALL = dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, mlp_hidden=0, dilated_segments=[4, 8, 16],
             dilated_rates=[1, 2, 4])


def _model(**overrides):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(**{**SMALL, "layers": ["dilated", "attention"], **overrides})).eval()


# Piece ends of the 45 tokens: prefill pieces across segment starts (16, 32), then decoding
# across 32, where the dilated layer's cache drops the previous segment.
CUTS = (0, 1, 2, 17, 29, *range(30, 46))
TOL = 1e-5


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_decode_and_chunked_prefill_match_full_forward(pos):
    """Pieces through the caches give the full pass's logits within TOL, and the test can
    tell: with either layer's cached keys and values zeroed before each piece, the logits
    miss by >= 100x TOL (the init's weights suffice: attention averages every cached value)."""
    model = _model(pos=pos)
    ids = torch.randint(0, 40, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(run_pieces(model, ids, CUTS), full, atol=TOL, rtol=TOL)
        for layer, part in state_parts(model):
            miss = misses(run_pieces(model, ids, CUTS, forget(layer, part)), full, TOL)
            assert miss >= 100, f"losing layer {layer}'s cache moves the logits only {miss:.1f}x TOL"


def test_cache_keeps_only_the_current_longest_segment():
    model = _model()
    state = model.init_state(1)
    generate(model, [1, 2, 3], 60, temperature=0, state=state)
    cache = state.layers[0]
    assert cache.seq_len == 62 and cache.start == 48  # 16 * (62 // 16)
    assert state.layers[1].start == 0  # the plain attention layer keeps everything


def test_save_restore_continue_equals_uninterrupted(tmp_path):
    model = _model()
    whole = generate(model, [1, 2, 3], 50, temperature=1.0, seed=3)
    state = model.init_state(1)
    first = generate(model, [1, 2, 3], 30, temperature=1.0, seed=3, state=state)
    model.save_state(state, tmp_path / "s.safetensors")
    rest = generate(model, torch.empty(1, 0, dtype=torch.long), 20, temperature=1.0,
                    state=model.load_state(tmp_path / "s.safetensors"))
    assert torch.equal(torch.cat([first, rest], 1), whole)


@pytest.mark.parametrize("overrides,match", [
    (dict(dilated_segments=[8, 4, 16]), "strictly increasing"),
    (dict(dilated_rates=[1, 2]), "same length"),
    (dict(dilated_rates=[2, 2, 4]), "no 1"),
    (dict(max_seq_len=64), "exceeds the longest dilated segment"),
    (dict(n_kv_heads=3), "multiple of model.n_kv_heads"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**SMALL, "layers": ["dilated"], **overrides})

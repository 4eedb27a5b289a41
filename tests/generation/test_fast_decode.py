"""The kernel decoding step (``fast_decode``) against the modules' forward: the same
logits and caches step after step, for every weight format and attention variant it
takes; None for what it does not take; and ``stream`` uses it."""

import importlib

import pytest
import torch

from longctx.generation import fast_decode, generate
from longctx.generation.fast_decode import fast_decoder
from longctx.layers.quantized import quantize_model
from longctx.model import LanguageModel, ModelConfig

TOL = dict(atol=2e-5, rtol=1e-5)


def _model(**overrides) -> LanguageModel:
    config = dict(vocab_size=80, d_model=64, n_heads=4, n_kv_heads=2, layers=["attention"] * 2, mlp_hidden=96)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # larger q and k than at initialisation: attention far from uniform
        for block in model.blocks:
            if hasattr(block.mixer, "qkv"):
                block.mixer.qkv.weight.mul_(4)
    return model


def _prefilled(model, n: int = 37):
    ids = torch.randint(0, 80, (1, n), generator=torch.Generator().manual_seed(1))
    states = [model.init_state(1), model.init_state(1)]
    with torch.no_grad():
        for state in states:
            model(ids, state)
    return states


CASES = {
    "gqa-rope": {},
    "mha-bias": dict(n_kv_heads=4, attn_bias=True, attn_out_bias=True),
    "mqa-no-positions": dict(n_kv_heads=1, pos="none"),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("case", CASES)
def test_steps_equal_the_modules_forward(case, kind):
    model = quantize_model(_model(**CASES[case]), kind)
    reference, fast = _prefilled(model)
    with torch.no_grad():
        step = fast_decoder(model, fast)
        assert step is not None
        for token in (3, 50, 7, 7, 79, 0):
            want = model(torch.tensor([[token]]), reference, last_only=True)[:, -1]
            got = step(torch.tensor([[token]]))
            torch.testing.assert_close(got, want, **TOL)
    assert fast.seq_len == reference.seq_len
    for a, b in zip(fast.layers, reference.layers):
        torch.testing.assert_close(a.state_dict(), b.state_dict(), **TOL)


def test_attention_to_the_cache_matters_by_far_more_than_the_tolerance():
    """Forgetting the cached tokens moves the logits by >= 100x the tolerance, so the test
    above would see a step that attends to the wrong keys."""
    model = _model()
    full, forgetful = _prefilled(model)
    with torch.no_grad():
        for cache in forgetful.layers:
            k, v, lo, hi = cache.head_major()
            k[:, :, lo : hi - 1].zero_()
            v[:, :, lo : hi - 1].zero_()
        a = fast_decoder(model, full)(torch.tensor([[3]]))
        b = fast_decoder(model, forgetful)(torch.tensor([[3]]))
    assert (a - b).abs().max() >= 100 * TOL["atol"]


@pytest.mark.parametrize("why", ["batch 2", "sinks cache", "alibi", "attention window", "mamba layer", "gradients",
                                 "learned positions"])
def test_declines_what_the_kernels_do_not_cover(why):
    overrides = {"alibi": dict(pos="alibi"), "attention window": dict(attn_window=8),
                 "mamba layer": dict(layers=["attention", "mamba"]),
                 "learned positions": dict(pos="learned", max_seq_len=64)}.get(why, {})
    model = _model(**overrides)
    state = model.init_state(2 if why == "batch 2" else 1, **({"cache": "sinks"} if why == "sinks cache" else {}))
    with torch.set_grad_enabled(why == "gradients"):
        assert fast_decoder(model, state) is None
    with torch.no_grad():
        assert fast_decoder(_model(), _model().init_state(1)) is not None  # the same model, covered


def test_stream_decodes_with_it_and_gives_the_modules_tokens(monkeypatch):
    model = quantize_model(_model(), "int8")
    calls = []
    build = fast_decode.fast_decoder

    def counted(model, state):
        step = build(model, state)
        return None if step is None else lambda token: calls.append(1) or step(token)

    generate_module = importlib.import_module("longctx.generation.generate")
    monkeypatch.setattr(generate_module, "fast_decoder", counted)
    fast = generate(model, [5, 9, 11], 20, temperature=0)
    assert len(calls) == 19  # every step after the prompt's
    monkeypatch.setattr(generate_module, "fast_decoder", lambda model, state: None)
    assert torch.equal(fast, generate(model, [5, 9, 11], 20, temperature=0))

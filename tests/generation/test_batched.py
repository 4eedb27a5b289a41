"""The batched decoding step (``batched``) against each sequence's own one-token forward:
sequences of different lengths, every attention variant and cache policy it takes, fp32
and quantized weights; and a clear refusal for models it does not take."""

import pytest
import torch

from longctx.generation import prefill
from longctx.generation import batched
from longctx.generation.batched import batched_step, unbatchable
from longctx.layers.quantized import quantize_model
from longctx.model import LanguageModel, ModelConfig

TOL = dict(atol=2e-5, rtol=1e-5)
VOCAB = 80


def _model(**overrides) -> LanguageModel:
    config = dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_kv_heads=2, layers=["attention"] * 2, mlp_hidden=96,
                  max_seq_len=512)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # larger q and k than at initialisation: attention far from uniform
        for block in model.blocks:
            block.mixer.qkv.weight.mul_(4)
    return model


CASES = {
    "gqa-rope": ({}, {}),
    "mha-bias": (dict(n_kv_heads=4, attn_bias=True, attn_out_bias=True), {}),
    "no-positions": (dict(n_kv_heads=1, pos="none"), {}),
    "alibi": (dict(pos="alibi"), {}),
    "learned-positions": (dict(pos="learned"), {}),
    "sink-token": (dict(sink_token=True), {}),
    "attention-window": (dict(attn_window=16), {}),
    "dynamic-rope": (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0,
                                        "original_max_position_embeddings": 16}), {}),
    # small enough that the longer prompts evict
    "sinks": ({}, dict(cache="sinks", sinks=2, window=24)),
    "recall": (dict(max_seq_len=1024), dict(cache="recall", sinks=2, window=16, block=8, topk=2)),
}
LENGTHS = (1, 5, 30, 61)  # one sequence each: every cache holds a different number of tokens


@pytest.mark.parametrize("kind", ["fp32", "int8"])
@pytest.mark.parametrize("case", CASES)
def test_batched_steps_equal_each_sequences_own_step(case, kind):
    _check_batched_steps(case, kind)


def test_long_caches_attend_on_numba_threads(monkeypatch):
    monkeypatch.setattr(batched, "PARALLEL_KEYS", 16)  # the longer two of LENGTHS
    _check_batched_steps("gqa-rope", "fp32")


def _check_batched_steps(case, kind):
    config, cache = CASES[case]
    model = quantize_model(_model(**config), kind)
    ids = torch.randint(0, VOCAB, (max(LENGTHS),), generator=torch.Generator().manual_seed(1))
    batched = [model.init_state(1, **cache) for _ in LENGTHS]
    for state, n in zip(batched, LENGTHS):
        prefill(model, ids[None, :n], state)  # in pieces where a bounded cache needs them
    alone = [s.fork() for s in batched]
    assert unbatchable(model, batched[0]) is None
    for tokens in ([3, 50, 7, 79], [7, 7, 0, 12], [1, 2, 3, 4]):
        got = batched_step(model, torch.tensor(tokens), batched)
        with torch.no_grad():
            want = torch.cat([model(torch.tensor([[t]]), s, last_only=True)[:, -1] for t, s in zip(tokens, alone)])
        torch.testing.assert_close(got, want, **TOL)
    assert [s.seq_len for s in batched] == [s.seq_len for s in alone]


def test_a_batch_of_one_and_the_seams_it_checks():
    model = _model()
    state = model.init_state(1)
    with pytest.raises(ValueError, match="prefill"):
        batched_step(model, torch.tensor([1]), [state])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), state)
    alone = state.fork()
    with torch.no_grad():
        want = model(torch.tensor([[4]]), alone, last_only=True)[:, -1]
    torch.testing.assert_close(batched_step(model, torch.tensor([4]), [state]), want, **TOL)
    with pytest.raises(ValueError, match="one token per state"):
        batched_step(model, torch.tensor([1, 2]), [state])
    with pytest.raises(ValueError, match="batch-1"):
        batched_step(model, torch.tensor([1]), [model.init_state(2)])


@pytest.mark.parametrize("layers, name", [(["mamba", "attention"], "Mamba"), (["dilated"], "DilatedAttention")])
def test_other_mixers_are_refused_with_the_reason(layers, name):
    model = LanguageModel(ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=2, layers=layers, max_seq_len=16,
                                      dilated_segments=[16], dilated_rates=[1])).eval()
    reason = unbatchable(model, model.init_state(1))
    assert reason is not None and "attention layers only" in reason and name in reason

import pytest
import torch

from longctx.model import ConfigError, LanguageModel, ModelConfig
from longctx.ops.dilated import attended_pairs


def _model(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=32, layers=["attention"] * 2, n_heads=4, n_kv_heads=2)
    cfg.update(overrides)
    return LanguageModel(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned", "none"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_prefill_and_decode_match_full_forward(pos, n_kv_heads):
    model = _model(pos=pos, n_kv_heads=n_kv_heads, max_seq_len=64)
    ids = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(2)
        pieces = [model(ids[:, :11], state), model(ids[:, 11:20], state)]
        pieces += [model(ids[:, t : t + 1], state) for t in range(20, 37)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert state.seq_len == 37


def test_state_round_trips_through_state_dict():
    model = _model()
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        s = model.init_state(1)
        model(ids[:, :10], s)
        saved = s.state_dict()
        a = model(ids[:, 10:], s)
        s2 = model.init_state(1)
        s2.load_state_dict(saved)
        b = model(ids[:, 10:], s2)
    torch.testing.assert_close(a, b)


def test_tied_embeddings_share_storage():
    m = _model()
    assert m.lm_head.weight.data_ptr() == m.embed.weight.data_ptr()
    m = _model(tie_embeddings=False)
    assert m.lm_head.weight.data_ptr() != m.embed.weight.data_ptr()


def test_bad_ids_are_rejected():
    model = _model(pos="learned", max_seq_len=16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(n_heads=4, n_kv_heads=3), "multiple of model.n_kv_heads"),
        (dict(pos="xpos"), "model.pos must be one of"),
        (dict(pos="learned"), "max_seq_len"),
        (dict(d_model=30, n_heads=4), "not divisible"),
        (dict(vocab_size=0), "model.vocab_size"),
        (dict(layers=[]), "model.layers"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**overrides)


def test_unknown_keys_and_mixers():
    with pytest.raises(ConfigError, match="unknown model config key.*dmodel"):
        ModelConfig.from_dict({"dmodel": 3})
    with pytest.raises(ConfigError, match="unknown mixer.*'mamba9'.*available: attention"):
        LanguageModel(ModelConfig(layers=["attention", "mamba9"]))


def test_state_from_another_model_is_rejected():
    small, big = _model(layers=["attention"]), _model(layers=["attention"] * 3)
    s = small.init_state(1)
    with torch.no_grad():
        small(torch.tensor([[1, 2, 3]]), s)
    with pytest.raises(ValueError, match="this model has 3 layers"):
        big.init_state(1).load_state_dict(s.state_dict())


def test_training_through_a_state_backpropagates_across_segments():
    """Truncated backprop over two segments: gradients equal one pass over the whole."""
    model = _model().train()
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(3))
    full = model(ids).sum()
    g_full = torch.autograd.grad(full, list(model.parameters()))
    s = model.init_state(2)
    seg = model(ids[:, :10], s).sum() + model(ids[:, 10:], s).sum()
    g_seg = torch.autograd.grad(seg, list(model.parameters()))
    for a, b in zip(g_seg, g_full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layers,window", [(["attention"] * 2, None), (["attention", "mamba"], 5),
                                           (["dilated", "attention"], None)])
def test_flops_per_token_counts_the_attended_pairs(layers, window):
    """Training: 6 N for the matmuls, plus 12 head_dim FLOPs per (query, key) pair a head
    attends to; the forward alone: 2 N and 4 head_dim."""
    time = 23
    model = _model(layers=layers, attn_window=window, dilated_segments=[4, 32], dilated_rates=[1, 2], max_seq_len=32)
    c = model.config
    matmul = 6 * (model.num_parameters(embeddings=False) + (model.lm_head.weight.numel() if c.tie_embeddings else 0))
    distance = torch.arange(time)[:, None] - torch.arange(time)[None, :]
    dense = int(((distance >= 0) & (distance < (window or time))).sum())
    dilated = attended_pairs(time, c.n_heads, c.dilated_segments, c.dilated_rates)  # tested in tests/ops
    pairs = layers.count("attention") * c.n_heads * dense + layers.count("dilated") * dilated
    assert model.flops_per_token(time) == pytest.approx(matmul + 12 * c.head_dim * pairs / time)
    assert model.flops_per_token(time, backward=False) == pytest.approx(matmul / 3 + 4 * c.head_dim * pairs / time)

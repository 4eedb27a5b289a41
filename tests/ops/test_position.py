import importlib

import pytest
import torch

from longctx.ops import rope
from longctx.ops.rope import check_rope_scaling, rope_attention_factor, rope_frequencies


def test_rope_is_a_rotation_by_relative_position():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 2, 16, generator=g)
    k = torch.randn(1, 1, 2, 16, generator=g)
    def score(i, j):
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum()
    # Depends only on i - j, also far out where fp32 angles would lose precision.
    torch.testing.assert_close(score(5, 2), score(1_000_003, 1_000_000), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope(q, torch.tensor([0])), q)
    assert torch.allclose(rope(q, torch.tensor([7])).norm(), q.norm())


def test_rope_matches_rotate_half_formula():
    x = torch.randn(2, 3, 1, 4, dtype=torch.float64)
    pos = torch.tensor([0, 4, 9])
    inv = 1.0 / (500.0 ** (torch.arange(0, 4, 2, dtype=torch.float64) / 4))
    ang = pos[:, None].double() * inv
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None]
    rot = torch.cat([-x[..., 2:], x[..., :2]], -1)
    torch.testing.assert_close(rope(x, pos, theta=500.0), x * cos + rot * sin)


def test_rope_per_batch_positions():
    x = torch.randn(2, 3, 2, 8)
    pos = torch.tensor([[0, 1, 2], [10, 11, 12]])
    out = rope(x, pos)
    torch.testing.assert_close(out[1:], rope(x[1:], torch.tensor([10, 11, 12])))


def test_rope_errors():
    with pytest.raises(ValueError, match="even head_dim"):
        rope(torch.randn(1, 2, 1, 3), torch.arange(2))
    with pytest.raises(ValueError, match="entries"):
        rope(torch.randn(1, 2, 1, 4), torch.arange(3))


SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2,
     "mscale": 0.7, "mscale_all_dim": 1.0, "truncate": False},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": 1.3},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
@pytest.mark.parametrize("seq_len", [None, 50, 300])
def test_scaled_frequencies_match_transformers(scaling, seq_len):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta = 32, 5000.0
    original = scaling.get("original_max_position_embeddings", 64)
    params = {**scaling, "rope_theta": theta}
    if scaling["rope_type"] == "dynamic":  # transformers scales from max_position_embeddings
        params.pop("original_max_position_embeddings")
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=original,
                                   rope_parameters=params)
    want, want_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu", seq_len=seq_len)
    got = rope_frequencies(head_dim, theta, scaling=check_rope_scaling(scaling), seq_len=seq_len)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert rope_attention_factor(scaling) == pytest.approx(want_factor, rel=1e-12)


def test_scaled_rope_rotates_and_scales():
    x = torch.randn(1, 5, 2, 16, dtype=torch.float64)
    pos = torch.arange(5)
    plain = rope(x, pos)
    torch.testing.assert_close(rope(x, pos, scaling={"rope_type": "linear", "factor": 2.0}), rope(x, pos / 2.0))
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "attention_factor": 1.5}
    torch.testing.assert_close(rope(x, pos, scaling=yarn).norm(dim=-1), 1.5 * plain.norm(dim=-1))
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}
    torch.testing.assert_close(rope(x, pos, scaling=dynamic), plain)  # 5 <= 8 positions: unscaled
    # the length defaults to the largest position + 1, as transformers counts it
    torch.testing.assert_close(rope(x, pos + 10, scaling=dynamic), rope(x, pos + 10, scaling=dynamic, seq_len=15))
    assert not torch.allclose(rope(x, pos, scaling=dynamic, seq_len=16), plain)


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not supported; supported: linear, dynamic, llama3, yarn"),
    ({"factor": 2.0}, "rope_type None is not supported"),
    ({"rope_type": "linear"}, "needs factor"),
    ({"rope_type": "linear", "factor": 0}, "factor must be positive"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, "unknown key.*beta_fast"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1.5}, "positive integer"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, "high_freq_factor > low_freq_factor"),
    ("linear", "must be a dict"),
])
def test_rope_scaling_errors(scaling, match):
    with pytest.raises(ValueError, match=match):
        check_rope_scaling(scaling)


@pytest.mark.parametrize("scaling", [None, *SCALINGS], ids=lambda s: "plain" if s is None else s["rope_type"])
def test_cached_table_equals_direct_angles(scaling, monkeypatch):
    """On CPU, integer positions below TABLE_MAX read cos and sin from a cached table: the
    same values as computing the angles per call (TABLE_MAX = 0), in every layout."""
    rope_module = importlib.import_module("longctx.ops.rope")
    x = torch.randn(2, 5, 3, 16)
    cases = [torch.arange(5), torch.tensor([[0, 1, 2, 3, 4], [900, 901, 950, 3000, 2]]),
             torch.arange(70_000, 70_005)]  # the last beyond the table: computed directly either way
    scaling = check_rope_scaling(scaling)
    tabled = [rope(x, pos, 5000.0, scaling=scaling) for pos in cases]
    monkeypatch.setattr(rope_module, "TABLE_MAX", 0)
    for pos, got in zip(cases, tabled):
        assert torch.equal(got, rope(x, pos, 5000.0, scaling=scaling))

import math

import pytest
import torch

from longctx.ops import alibi_slopes, rope


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


@pytest.mark.parametrize("n", [1, 6, 8, 12])
def test_alibi_slopes(n):
    s = alibi_slopes(n)
    assert s.shape == (n,) and (s > 0).all() and (s <= 1).all()
    if n == 8:
        torch.testing.assert_close(s, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert len(set(s.tolist())) == n

"""Distributed dilated attention equals single-process dilated_attention, values and gradients."""

import pytest
import torch

from longctx.distributed.dilated import distributed_dilated_attention
from longctx.distributed.layout import shard_sequence
from longctx.ops import alibi_slopes
from longctx.ops.dilated import dilated_attention
from tests.distributed.harness import run_ranks

CASES = [  # (total, heads, kv_heads, segments, rates, causal, alibi)
    (32, 4, 2, [4, 8, 16, 32], [1, 2, 4, 8], True, False),
    (32, 4, 4, [4, 8, 16, 32], [1, 2, 3, 8], False, False),
    (24, 6, 2, [2, 6, 12, 24], [1, 2, 5, 6], True, True),
]


def _inputs(total, heads, kv_heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, total, heads, 8, generator=g)
    k, v = (torch.randn(2, total, kv_heads, 8, generator=g) for _ in range(2))
    d_out, d_lse = torch.randn(2, total, heads, 8, generator=g), torch.randn(2, total, heads, generator=g)
    return q, k, v, d_out, d_lse


def _run(q, k, v, d_out, d_lse, fn, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    return [x.detach() for x in (out, lse, q.grad, k.grad, v.grad)]


def _rank(rank, world, cases):
    results = []
    for total, heads, kv_heads, segs, rates, causal, alibi in cases:
        full = _inputs(total, heads, kv_heads)
        local = [shard_sequence(x) for x in full]
        kw = dict(segment_lengths=segs, dilation_rates=rates, causal=causal,
                  alibi_slopes=alibi_slopes(heads) if alibi else None)
        results.append(_run(*local, distributed_dilated_attention, **kw))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world):
    per_rank = run_ranks(_rank, world, CASES)
    for c, (total, heads, kv_heads, segs, rates, causal, alibi) in enumerate(CASES):
        kw = dict(segment_lengths=segs, dilation_rates=rates, causal=causal,
                  alibi_slopes=alibi_slopes(heads) if alibi else None)
        ref = _run(*_inputs(total, heads, kv_heads), dilated_attention, **kw)
        for name, i in zip(("out", "lse", "dq", "dk", "dv"), range(5)):
            got = torch.cat([per_rank[r][c][i] for r in range(world)], dim=1)
            torch.testing.assert_close(got, ref[i], rtol=1e-5, atol=1e-5, msg=lambda m: f"case {c} {name}: {m}")


def _bad(rank, world):
    q = torch.randn(1, 6, 2, 4)
    try:
        distributed_dilated_attention(q, q, q, segment_lengths=[4, 12], dilation_rates=[1, 2])
    except ValueError as e:
        return str(e)
    return None


def test_segments_must_align_with_shards():
    assert all("neither divides nor is a multiple" in msg for msg in run_ranks(_bad, 2))

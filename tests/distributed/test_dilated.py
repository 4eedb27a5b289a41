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


def _kwargs(heads, segs, rates, causal, alibi):
    return dict(segment_lengths=segs, dilation_rates=rates, causal=causal,
                alibi_slopes=alibi_slopes(heads) if alibi else None)


def run_cases(rank, world, cases):
    """This rank's out, lse and gradients for each case."""
    results = []
    for total, heads, kv_heads, segs, rates, causal, alibi in cases:
        local = [shard_sequence(x) for x in _inputs(total, heads, kv_heads)]
        results.append(_run(*local, distributed_dilated_attention, **_kwargs(heads, segs, rates, causal, alibi)))
    return results


def check_cases(per_rank, cases):
    """Every rank's ``run_cases`` results, put back in sequence order, against single-process dilated attention."""
    for c, (total, heads, kv_heads, segs, rates, causal, alibi) in enumerate(cases):
        ref = _run(*_inputs(total, heads, kv_heads), dilated_attention, **_kwargs(heads, segs, rates, causal, alibi))
        for name, i in zip(("out", "lse", "dq", "dk", "dv"), range(5)):
            got = torch.cat([results[c][i] for results in per_rank], dim=1)
            torch.testing.assert_close(got, ref[i], rtol=1e-5, atol=1e-5, msg=lambda m: f"case {c} {name}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world):
    check_cases(run_ranks(run_cases, world, CASES), CASES)


def _bad(rank, world):
    q = torch.randn(1, 6, 2, 4)
    try:
        distributed_dilated_attention(q, q, q, segment_lengths=[4, 12], dilation_rates=[1, 2])
    except ValueError as e:
        return str(e)
    return None


def test_segments_must_align_with_shards():
    assert all("neither divides nor is a multiple" in msg for msg in run_ranks(_bad, 2))

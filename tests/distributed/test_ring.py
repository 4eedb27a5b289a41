"""ring_attention on 1, 2 and 4 gloo ranks against single-process attention on the full sequence."""

import functools

import pytest
import torch
import torch.distributed as dist

from longctx.distributed.layout import chunk_ids, gather_sequence, shard_sequence
from longctx.distributed.ring import _plan, ring_attention
from longctx.ops import attention
from tests.distributed.harness import run_ranks

BATCH, DIM = 2, 8

# (ring size or None for the whole world, causal, layout, total length, heads, kv heads).  Lengths
# are not powers of two (24 over 4 zigzag ranks: chunks of 3); subgroups test P == 1 and peers
# given as global ranks.
CASES = {
    2: [
        (None, True, "contiguous", 12, 4, 4),
        (None, True, "zigzag", 12, 4, 2),
        (None, False, "contiguous", 10, 4, 2),
        (None, False, "zigzag", 12, 4, 4),
        (1, True, "zigzag", 6, 4, 2),
        (1, False, "contiguous", 5, 4, 4),
    ],
    4: [
        (None, True, "zigzag", 24, 4, 2),
        (None, True, "contiguous", 20, 4, 4),
        (None, False, "zigzag", 24, 4, 2),
        (None, False, "contiguous", 12, 4, 1),
        (2, True, "zigzag", 12, 4, 2),
    ],
}
NAMES = ("out", "lse", "dq", "dk", "dv")


def _inputs(total, heads, kv_heads):
    """Full q, k, v and the loss weights d_out, d_lse, the same in every process."""
    g = torch.Generator().manual_seed(total * 100 + heads * 10 + kv_heads)
    q = torch.randn(BATCH, total, heads, DIM, generator=g)
    k, v = (torch.randn(BATCH, total, kv_heads, DIM, generator=g) for _ in range(2))
    return q, k, v, torch.randn(BATCH, total, heads, DIM, generator=g), torch.randn(BATCH, total, heads, generator=g)


def _results(fn, q, k, v, d_out, d_lse, **kw):
    """out, lse and the gradients of sum(out * d_out) + sum(lse * d_lse)."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    loss = (out * d_out).sum() + (lse * d_lse).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def _run_cases(rank, world, cases):
    """Every case on this rank; results gathered into full sequences."""
    groups = {None: None}
    for size in sorted({case[0] for case in cases} - {None}):
        groups[size] = dist.new_subgroups(size)[0]  # collective: every rank makes every subgroup
    results = {}
    for case in cases:
        size, causal, layout, total, heads, kv_heads = case
        group = groups[size]
        local = [shard_sequence(x, group, layout) for x in _inputs(total, heads, kv_heads)]
        parts = _results(ring_attention, *local, group=group, causal=causal, layout=layout)
        results[case] = [gather_sequence(x, group, layout) for x in parts]
    return results


@functools.cache
def _ring_results(world):
    """Rank 0's results of every case for ``world`` ranks (one spawn per world size)."""
    return run_ranks(_run_cases, world, CASES[world])[0]


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases])
def test_matches_single_process_attention(world, case):
    _, causal, _, total, heads, kv_heads = case
    ring = _ring_results(world)[case]
    ref = _results(attention, *_inputs(total, heads, kv_heads), causal=causal)
    for name, a, b in zip(NAMES, ring, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_zigzag_plan_is_one_call_per_step_and_balanced():
    """Under a causal mask every zigzag rank makes one kernel call per step (its own block: one
    square causal call) and attends the same number of (query, key) rows overall."""
    world, size = 4, 3
    work = set()
    for rank in range(world):
        plans = [_plan(chunk_ids(rank, world, "zigzag"), chunk_ids((rank - s) % world, world, "zigzag"), True, size)
                 for s in range(world)]
        assert [len(p) for p in plans] == [1] * world
        assert plans[0] == [(slice(0, 2 * size), 2 * size, True)]
        work.add(sum((rows.stop - rows.start) * keys for p in plans for rows, keys, _ in p))
    assert len(work) == 1


def test_rejects_bad_arguments():
    """Checked before any communication, so no process group is needed."""
    q, k = torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, k, k, layout="diagonal")
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        ring_attention(q, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))
    with pytest.raises(ValueError, match="must match q"):
        ring_attention(q, torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 2, 8))
    with pytest.raises(ValueError, match="one shape"):
        ring_attention(q, k, torch.zeros(1, 4, 1, 8))

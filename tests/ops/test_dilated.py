"""dilated_attention (strided gathers + fused kernel) against dilated_attention_ref (dense masks)."""

import pytest
import torch

from longctx.ops import alibi_slopes, attention
from longctx.ops import dilated as dilated_module
from longctx.ops.dilated import (
    AllOffsetsPiece,
    attended_pairs,
    check_patterns,
    dilated_attention,
    dilated_attention_ref,
    dilated_patterns,
    first_needed_position,
    plan_pattern,
)


def _inputs(batch, time, kv_time, heads, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, time, heads, dim, generator=g), torch.randn(batch, kv_time, kv_heads, dim, generator=g),
            torch.randn(batch, kv_time, kv_heads, dim, generator=g))


def _grads(fn, q, k, v, seed=1, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (lse * torch.randn(lse.shape, generator=g)).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def _compare(q, k, v, **kw):
    """The training path (values and gradients) and the inference path (which merges the
    pieces one by one) against the reference."""
    fast = _grads(dilated_attention, q, k, v, **kw)
    ref = _grads(dilated_attention_ref, q.double(), k.double(), v.double(), **kw)
    with torch.no_grad():
        inference = dilated_attention(q, k, v, **kw)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "inference out", "inference lse"),
                          (*fast, *inference), (*ref, *ref[:2])):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


PATTERNS = {
    "geometric": ([4, 8, 16], [1, 2, 4]),
    "r-not-dividing-w": ([3, 7, 20], [1, 3, 6]),
    "one": ([5], [1]),
    "rates-above-heads": ([4, 8, 32], [1, 2, 8]),
}


@pytest.mark.parametrize("time", [1, 7, 16, 63])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_matches_reference(time, causal, pattern, heads, kv_heads):
    segs, rates = PATTERNS[pattern]
    q, k, v = _inputs(2, time, time, heads, kv_heads, 8)
    _compare(q, k, v, segment_lengths=segs, dilation_rates=rates, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("time,segs,rates", [(29, [4, 12], [1, 3]), (32, [4, 8, 16], [1, 2, 8])])
def test_alibi_uses_true_distances(causal, time, segs, rates):
    q, k, v = _inputs(1, time, time, 4, 4, 8)
    _compare(q, k, v, segment_lengths=segs, dilation_rates=rates, causal=causal, alibi_slopes=alibi_slopes(4))


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("time,kv_time,kv_start", [(1, 21, 0), (3, 10, 0), (1, 5, 16), (6, 13, 8), (9, 9, 16),
                                                   (12, 20, 0)])
def test_queries_after_cached_keys(time, kv_time, kv_start, kv_heads):
    """Decoding / chunked prefill: queries are the last keys, keys may start after position 0."""
    q, k, v = _inputs(1, time, kv_time, 4, kv_heads, 8)
    _compare(q, k, v, segment_lengths=[4, 8], dilation_rates=[1, 2], kv_start=kv_start)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_calls_split_into_groups_of_segments(monkeypatch, kv_heads):
    """Long inputs run full segments in several kernel calls (``_CALL_ROWS``); shrink the
    budget so these small inputs do too."""
    monkeypatch.setattr(dilated_module, "_CALL_ROWS", 8)
    segs, rates = [4, 8, 16], [1, 2, 8]
    assert len(plan_pattern(0, 4, 1, 4, kv_heads, 40, 0, 0)) == 10  # ten segments, 16 rows each
    q, k, v = _inputs(2, 40, 40, 4, kv_heads, 8)
    _compare(q, k, v, segment_lengths=segs, dilation_rates=rates)
    q, k, v = _inputs(1, 9, 29, 4, kv_heads, 8)
    _compare(q, k, v, segment_lengths=segs, dilation_rates=rates)


@pytest.mark.parametrize("r,heads,kv_heads,time,all_offsets", [
    (4, 4, 4, 32, 1),   # r = heads: each head its own offset
    (8, 4, 4, 32, 1),   # r above heads
    (8, 4, 4, 24, 1),   # the short last segment too (8 | 24 - 16)
    (2, 4, 4, 32, 0),   # r below heads: one call per offset, heads / r heads each
    (8, 4, 2, 32, 0),   # grouped kv heads
    (6, 4, 4, 32, 0),   # r does not divide the segment
])
def test_plan_batches_every_head_offset_where_it_fits(r, heads, kv_heads, time, all_offsets):
    """The batched plan is what the reference tests above exercise at these rates: check
    that it is taken where it fits, and the per-offset pieces elsewhere."""
    w = 16
    pieces = plan_pattern(0, w, r, heads, kv_heads, time, 0, 0)
    batched = [p for p in pieces if isinstance(p, AllOffsetsPiece)]
    assert len(batched) == (all_offsets * (1 + (time % w > 0)))
    assert len(pieces) == len(batched) + (not all_offsets) * min(r, heads) * (1 + (time % w > 0))


def test_single_pattern_of_rate_one_covering_everything_is_causal_attention():
    q, k, v = _inputs(2, 37, 37, 4, 2, 8)
    out, lse = dilated_attention(q, k, v, segment_lengths=[64], dilation_rates=[1])
    ref_out, ref_lse = attention(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_prefix_of_a_longer_sequence_is_unchanged():
    """Causal: outputs for the first t positions do not depend on later tokens."""
    q, k, v = _inputs(1, 40, 40, 4, 4, 8)
    kw = dict(segment_lengths=[4, 8, 32], dilation_rates=[1, 2, 4])
    full, _ = dilated_attention(q, k, v, **kw)
    part, _ = dilated_attention(q[:, :23], k[:, :23], v[:, :23], **kw)
    torch.testing.assert_close(part, full[:, :23], atol=1e-6, rtol=1e-6)


def test_patterns_helper_and_first_needed_position():
    assert dilated_patterns(8192) == ([2048, 4096, 8192], [1, 2, 4])
    assert dilated_patterns(100, first_segment=16, ratio=4) == ([16, 64, 256], [1, 4, 16])
    assert first_needed_position(100, [16, 64]) == 64
    assert first_needed_position(100, [16, 48]) == 96


@pytest.mark.parametrize("time,segs,rates", [(1, [4], [1]), (37, [4, 8, 16], [1, 2, 3]), (64, [8, 32], [1, 4]),
                                             (50, [16, 64], [1, 8])])
def test_attended_pairs_counts_the_allowed_pairs(time, segs, rates):
    """Against a count of (query, key) pairs by the rule: same segment, key not after the
    query, both kept for the head (offset head % r)."""
    heads = 5
    pos = torch.arange(time)
    expected = 0
    for w, r in zip(segs, rates):
        for h in range(heads):
            kept = (pos % w) % r == h % r
            allowed = (pos[:, None] // w == pos[None, :] // w) & (pos[None, :] <= pos[:, None])
            expected += int((allowed & kept[:, None] & kept[None, :]).sum())
    assert attended_pairs(time, heads, segs, rates) == expected


@pytest.mark.parametrize("segs,rates,match", [
    ([8, 4], [1, 2], "strictly increasing"),
    ([4, 4], [1, 2], "strictly increasing"),
    ([4, 8], [1], "same length"),
    ([4, 8], [0, 2], "rate"),
    ([4, 8], [1, 9], "rate 9 for segment 8"),
    ([4, 8], [2, 2], "no 1"),
    ([], [], "non-empty"),
    ([4.0, 8], [1, 2], "integers"),
])
def test_invalid_patterns(segs, rates, match):
    with pytest.raises(ValueError, match=match):
        check_patterns(segs, rates)
    q, k, v = _inputs(1, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, segment_lengths=segs, dilation_rates=rates)


def test_bad_shapes_and_missing_keys():
    q, k, v = _inputs(1, 8, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        dilated_attention(q, k, v, segment_lengths=[4], dilation_rates=[1])
    q, k, v = _inputs(1, 2, 4, 2, 2, 4)
    with pytest.raises(ValueError, match="need the keys of their segment"):
        dilated_attention(q, k, v, segment_lengths=[4, 8], dilation_rates=[1, 2], kv_start=2)
    with pytest.raises(ValueError, match="as many keys as queries"):
        dilated_attention(q, k, v, segment_lengths=[4], dilation_rates=[1], causal=False)

import pytest
import torch

from longctx.ops import alibi_slopes, attention, attention_ref, merge
import importlib

attention_module = importlib.import_module("longctx.ops.attention")


def _inputs(batch, time, kv_time, heads, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, time, heads, dim, generator=g, dtype=torch.float64).float()
    k = torch.randn(batch, kv_time, kv_heads, dim, generator=g, dtype=torch.float64).float()
    v = torch.randn(batch, kv_time, kv_heads, dim, generator=g, dtype=torch.float64).float()
    return q, k, v


def _grads(fn, q, k, v, seed=1, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    g = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=g)
    d_lse = torch.randn(lse.shape, generator=g)
    # lse can be -inf only for rows with no keys; none here.
    loss = (out * d_out).sum() + (lse * d_lse).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


@pytest.mark.parametrize("time", [1, 7, 63, 257])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_reference(time, causal, heads, kv_heads):
    q, k, v = _inputs(2, time, time, heads, kv_heads, 16)
    fast = _grads(attention, q, k, v, causal=causal)
    ref = _grads(attention_ref, q.double(), k.double(), v.double(), causal=causal)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("time,kv_time", [(1, 64), (5, 64), (63, 257), (257, 300)])
@pytest.mark.parametrize("alibi", [False, True])
def test_decoding_alignment_with_cache(time, kv_time, alibi):
    """kv_time > time: queries are the last `time` positions (bottom-right causal)."""
    q, k, v = _inputs(1, time, kv_time, 4, 2, 8)
    slopes = alibi_slopes(4) if alibi else None
    fast = _grads(attention, q, k, v, alibi_slopes=slopes)
    ref = _grads(attention_ref, q.double(), k.double(), v.double(), alibi_slopes=slopes)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)
    # Same as the last rows of a full causal pass over the queries' own positions.
    q_full = torch.cat([torch.randn(1, kv_time - time, 4, 8), q], dim=1)
    out_full, lse_full = attention(q_full, k, v, alibi_slopes=slopes)
    out, lse = attention(q, k, v, alibi_slopes=slopes)
    torch.testing.assert_close(out, out_full[:, -time:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_full[:, -time:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("time", [7, 257])
@pytest.mark.parametrize("causal", [True, False])
def test_alibi_matches_reference(time, causal, monkeypatch):
    monkeypatch.setattr(attention_module, "_BLOCK", 32)  # several blocks at small sizes
    q, k, v = _inputs(2, time, time, 6, 3, 8)
    slopes = alibi_slopes(6)
    fast = _grads(attention, q, k, v, causal=causal, alibi_slopes=slopes)
    ref = _grads(attention_ref, q.double(), k.double(), v.double(), causal=causal, alibi_slopes=slopes)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_path_for_devices_without_the_flash_kernel(causal, monkeypatch):
    """Other devices go through query blocks and a plain kernel: same values and gradients."""
    monkeypatch.setattr(attention_module, "_BLOCK", 16)
    monkeypatch.setattr(attention_module, "_has_flash", lambda device: False)
    q, k, v = _inputs(2, 40, 50 if causal else 40, 4, 2, 8)
    fast = _grads(attention, q, k, v, causal=causal)
    ref = _grads(attention_ref, q.double(), k.double(), v.double(), causal=causal)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


def test_non_causal_alibi_penalises_distance_both_ways():
    q = torch.zeros(1, 5, 1, 4)
    k = torch.zeros(1, 5, 1, 4)
    v = torch.arange(5.0).view(1, 5, 1, 1).expand(1, 5, 1, 4).contiguous()
    out, _ = attention(q, k, v, causal=False, alibi_slopes=torch.tensor([1.0]))
    torch.testing.assert_close(out[0, 2, 0, 0], torch.tensor(2.0))  # symmetric around itself


def test_no_keys_gives_zero_output_attached_to_the_graph():
    q = torch.randn(1, 3, 2, 4, requires_grad=True)
    k = torch.randn(1, 0, 2, 4)
    out, lse = attention(q, k, k, causal=False)
    assert torch.isneginf(lse).all() and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


@pytest.mark.parametrize("split", [1, 30, 63])
def test_merge_of_two_halves_equals_whole(split):
    q, k, v = _inputs(2, 5, 64, 4, 2, 16)
    whole = attention(q, k, v, causal=False)
    a = attention(q, k[:, :split], v[:, :split], causal=False)
    b = attention(q, k[:, split:], v[:, split:], causal=False)
    out, lse = merge(*a, *b)
    torch.testing.assert_close(out, whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=1e-5)


def test_merge_gradients_match_whole():
    q, k, v = _inputs(1, 9, 20, 2, 2, 8)

    def merged(q, k, v):
        return merge(*attention(q, k[:, :8], v[:, :8], causal=False), *attention(q, k[:, 8:], v[:, 8:], causal=False))

    a = _grads(merged, q, k, v)
    b = _grads(attention_ref, q, k, v, causal=False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


def test_merge_with_empty_rows():
    out = torch.randn(1, 3, 2, 4)
    lse = torch.randn(1, 3, 2)
    empty_out = torch.zeros_like(out)
    empty_lse = torch.full_like(lse, float("-inf"))
    m_out, m_lse = merge(out, lse, empty_out, empty_lse)
    torch.testing.assert_close(m_out, out)
    torch.testing.assert_close(m_lse, lse)
    both_out, both_lse = merge(empty_out, empty_lse, empty_out, empty_lse)
    assert not both_out.isnan().any() and torch.isinf(both_lse).all()
    # Gradients through rows that saw no key at all stay finite (zero).
    parts = [t.clone().requires_grad_() for t in (empty_out, empty_lse, empty_out, empty_lse)]
    m_out, m_lse = merge(*parts)
    (m_out.sum() + m_lse.masked_fill(torch.isinf(m_lse), 0).sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in parts)


def test_bad_shapes_raise():
    q, k, v = _inputs(1, 4, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, v)
    q, k, v = _inputs(1, 8, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="at least as many keys"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="batch, time, heads, head_dim"):
        attention(q[0], k[0], v[0])


@pytest.mark.parametrize("time,kv_time", [(1, 1), (7, 7), (63, 63), (257, 257), (5, 64), (63, 300)])
@pytest.mark.parametrize("window", [1, 8, 100])
@pytest.mark.parametrize("alibi", [False, True])
def test_sliding_window_matches_reference(time, kv_time, window, alibi, monkeypatch):
    monkeypatch.setattr(attention_module, "_BLOCK", 32)  # several blocks at small sizes
    q, k, v = _inputs(2, time, kv_time, 4, 2, 8)
    slopes = alibi_slopes(4) if alibi else None
    fast = _grads(attention, q, k, v, window=window, alibi_slopes=slopes)
    ref = _grads(attention_ref, q.double(), k.double(), v.double(), window=window, alibi_slopes=slopes)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


def test_sliding_window_mask_and_plain_path():
    """Query i sees keys i - window + 1 .. i (transformers' convention); a window that reaches
    every key is the plain causal attention."""
    q, k, v = _inputs(1, 12, 12, 2, 2, 8)
    v = torch.eye(12)[None, :, None, :8].expand(1, 12, 2, 8).contiguous()  # value j marks key j (j < 8)
    out, _ = attention(q, k, v, window=3)
    seen = out[0, :, 0] > 0
    for i in range(8):
        assert seen[i].nonzero().flatten().tolist() == [j for j in range(max(0, i - 2), i + 1)]
    q, k, v = _inputs(2, 20, 30, 4, 1, 8)
    for a, b in zip(attention(q, k, v, window=30), attention(q, k, v)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(attention(q, k, v, window=29)[0], attention(q, k, v)[0])


def test_sliding_window_errors():
    q, k, v = _inputs(1, 4, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="positive integer"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="causal=True"):
        attention(q, k, v, causal=False, window=2)
    with pytest.raises(ValueError, match="causal=True"):
        attention_ref(q, k, v, causal=False, window=2)


@pytest.mark.parametrize("time", [1, 3, 8])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (6, 2), (6, 1)])
def test_few_queries_path_matches_reference_and_flash(time, causal, heads, kv_heads, monkeypatch):
    """Up to FEW_QUERIES queries (decoding) attend by matmuls over keys in a KV cache's
    head-major storage, read through a transpose; lse only on request."""
    q, k, v = _inputs(2, time, 40, heads, kv_heads, 16)
    k_cache, v_cache = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    out, lse = attention(q, k_cache, v_cache, causal=causal)
    want_out, want_lse = attention_ref(q.double(), k.double(), v.double(), causal=causal)
    torch.testing.assert_close(out.double(), want_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=1e-5)
    out_only, no_lse = attention(q, k_cache, v_cache, causal=causal, with_lse=False)
    assert no_lse is None
    torch.testing.assert_close(out_only, out, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(attention_module, "FEW_QUERIES", 0)
    flash_out, flash_lse = attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, flash_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, flash_lse, atol=2e-6, rtol=1e-5)

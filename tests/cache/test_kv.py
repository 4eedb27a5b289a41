"""KVCache: growth, trimming of keys no query can use, state round trip."""

import pytest
import torch

from longctx.cache.kv import KVCache


def _kv(n, start=0):
    """Keys whose value is their absolute position (batch 1, 1 head, dim 2)."""
    pos = torch.arange(start, start + n, dtype=torch.float32)
    k = pos[None, :, None, None].expand(1, n, 1, 2).clone()
    return k, -k


def test_growth_keeps_every_key():
    cache = KVCache(1)
    for start in range(0, 300, 7):
        k, v = cache.update(*_kv(7, start))
    assert cache.seq_len == k.shape[1] == 301
    assert torch.equal(k[0, :, 0, 0], torch.arange(k.shape[1], dtype=torch.float32))
    assert torch.equal(v, -k)


def test_trim_drops_old_keys_and_reuses_storage():
    cache = KVCache(1)
    for pos in range(1000):
        cache.trim(pos - pos % 50)  # keep the current block of 50
        k, v = cache.update(*_kv(1, pos))
        assert torch.equal(k[0, :, 0, 0], torch.arange(cache.start, pos + 1, dtype=torch.float32))
        assert torch.equal(v, -k)
    assert cache.seq_len == 1000 and cache.start == 950
    assert cache._k.shape[1] <= 128  # storage bounded by the kept part, not the 1000 seen


def test_trimmed_state_round_trip():
    cache = KVCache(1)
    cache.update(*_kv(30))
    cache.trim(20)
    restored = KVCache(1)
    restored.load_state_dict(cache.state_dict())
    assert (restored.start, restored.seq_len) == (20, 30)
    k, _ = restored.update(*_kv(2, 30))
    assert torch.equal(k[0, :, 0, 0], torch.arange(20, 32, dtype=torch.float32))


def test_trim_with_gradients():
    cache = KVCache(1)
    k0 = _kv(10)[0].requires_grad_()
    cache.update(k0, k0 * 2)
    cache.trim(6)
    k, v = cache.update(*(_kv(2, 10)[0].requires_grad_(),) * 2)
    assert torch.equal(k[0, :, 0, 0].detach(), torch.arange(6, 12, dtype=torch.float32))
    k.sum().backward()
    assert torch.equal(k0.grad[0, :, 0, 0], torch.tensor([0.0] * 6 + [1.0] * 4))


def test_loading_a_sink_state_into_a_dense_cache_says_so():
    cache = KVCache(1)
    with pytest.raises(ValueError, match="attention-sink or window cache"):
        cache.load_state_dict({"kept_k": torch.zeros(1), "kept_v": torch.zeros(1), "policy": torch.tensor([4, 8])})

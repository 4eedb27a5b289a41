"""SinkKVCache (StreamingLLM): the attention mixer against an explicit reference, eviction,
equality with the dense cache before eviction, session round trip, errors."""

import pytest
import torch

from longctx.cache.sink import SinkKVCache
from longctx.generation import generate
from longctx.model import LanguageModel, ModelConfig
from longctx.ops.rope import rope
from tests.ops.test_alibi import alibi_reference, paper_slopes

SMALL = dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, mlp_hidden=0)


def _model(layers=("attention", "attention"), **overrides):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(layers=list(layers), **{**SMALL, **overrides})).eval()


def _kept(t, n_sink, window):
    """Stream indices the cache holds after token ``t``: the sinks, then the last window."""
    return list(range(min(n_sink, t + 1))) + list(range(max(n_sink, t + 1 - window), t + 1))


def _reference_step(mixer, x, t, n_sink, window, stream_distances=False):
    """The mixer's output for token ``t`` of ``x`` ``(batch, time, d_model)``, built from its
    projections: the kept tokens at positions 0 .. kept - 1, the query at the last one (ALiBi:
    the paper's slopes and bias written out in tests/ops/test_alibi.py).  ``stream_distances``:
    ALiBi distances in the stream instead (what the cache must not do)."""
    q, k, v = mixer.qkv(x).split([mixer.n_heads * mixer.head_dim, *[mixer.n_kv_heads * mixer.head_dim] * 2], -1)
    q = q.view(*x.shape[:2], mixer.n_heads, -1)[:, t : t + 1]
    kept = _kept(t, n_sink, window)
    k = k.view(*x.shape[:2], mixer.n_kv_heads, -1)[:, kept]
    v = v.view(*x.shape[:2], mixer.n_kv_heads, -1)[:, kept]
    if mixer.pos == "rope":
        positions = torch.arange(len(kept))
        q, k = rope(q, positions[-1:], mixer.rope_theta), rope(k, positions, mixer.rope_theta)
    slopes = paper_slopes(mixer.n_heads) if mixer.pos == "alibi" else torch.zeros(mixer.n_heads)
    positions = dict(q_pos=torch.tensor([t]), k_pos=torch.tensor(kept)) if stream_distances else {}
    out, _ = alibi_reference(q, k, v, slopes, **positions)
    return mixer.out(out.float().reshape(x.shape[0], 1, -1))


@pytest.mark.parametrize("pos", ["rope", "alibi", "none"])
@pytest.mark.parametrize("n_sink", [2, 0])
def test_mixer_matches_reference_token_by_token(pos, n_sink):
    mixer = _model(pos=pos).blocks[0].mixer
    window, prefill = 8, 5
    x = torch.randn(2, 60, SMALL["d_model"], generator=torch.Generator().manual_seed(1))
    state = mixer.init_state(2, cache="sinks" if n_sink else "window", sinks=n_sink, window=window)
    with torch.no_grad():
        outs = [mixer(x[:, :prefill], state)] + [mixer(x[:, t : t + 1], state) for t in range(prefill, 60)]
        got = torch.cat(outs, 1)
        expected = torch.cat([_reference_step(mixer, x, t, n_sink, window) for t in range(60)], 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert state.seq_len == 60


def test_alibi_distances_are_counted_in_cache_order():
    """ALiBi with 6 heads over 2 kv heads: the kept tokens sit at positions 0 .. kept - 1, so once
    tokens are evicted a sink's bias is its distance in the cache, not in the stream.  Each token's
    output equals the reference with cache-order distances, and after eviction it is far from
    the one with stream distances."""
    mixer = _model(pos="alibi", n_heads=6, head_dim=8, init_std=0.2).blocks[0].mixer
    n_sink, window = 3, 8
    x = torch.randn(1, 40, SMALL["d_model"], generator=torch.Generator().manual_seed(1))
    state = mixer.init_state(1, cache="sinks", sinks=n_sink, window=window)
    with torch.no_grad():
        for t in range(40):
            got = mixer(x[:, t : t + 1], state)
            torch.testing.assert_close(got, _reference_step(mixer, x, t, n_sink, window), atol=1e-5, rtol=1e-5)
            if t >= n_sink + window:
                assert (got - _reference_step(mixer, x, t, n_sink, window, stream_distances=True)).abs().max() > 1e-3


def _stream_ids(n, start=0):
    """Keys whose value is their index in the stream (batch 1, 1 head, dim 2); values = -keys."""
    k = torch.arange(start, start + n, dtype=torch.float32)[None, :, None, None].expand(1, n, 1, 2).clone()
    return k, -k


@pytest.mark.parametrize("n_sink,window", [(3, 16), (0, 5), (4, 1)])
def test_eviction_keeps_sinks_and_window_in_constant_storage(n_sink, window):
    cache = SinkKVCache(1, n_sink, window)
    cache.update(*_stream_ids(2))
    storage = cache._k.data_ptr(), cache._k.shape
    for t in range(2, 500):
        k, v = cache.update(*_stream_ids(1, t))
        expected = torch.tensor(_kept(t, n_sink, window), dtype=torch.float32)
        assert torch.equal(k[0, :, 0, 0], expected) and torch.equal(v, -k)
        assert cache.evicted == t + 1 - len(expected)
    assert cache.seq_len == 500
    assert (cache._k.data_ptr(), cache._k.shape) == storage  # never reallocated
    assert cache._k.shape[1] == 2 * (n_sink + window)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_short_stream_equals_dense_cache_exactly(pos):
    model = _model(("attention", "mamba", "attention"), pos=pos)
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(2))
    runs = []
    with torch.no_grad():
        for options in ({}, dict(cache="sinks", sinks=4, window=16)):
            state = model.init_state(2, **options)
            prefill = model(ids[:, :7], state)
            runs.append(torch.cat([prefill] + [model(ids[:, t : t + 1], state) for t in range(7, 20)], 1))
    assert torch.equal(runs[0], runs[1])


def test_init_state_gives_sink_caches_to_attention_layers_only():
    state = _model(("mamba", "attention", "mamba2"), ssm_head_dim=16).init_state(1, cache="sinks", sinks=2, window=8)
    assert [type(s).__name__ for s in state.layers] == ["SSMState", "SinkKVCache", "SSMState"]
    assert (state.layers[1].n_sink, state.layers[1].window) == (2, 8)
    window = _model().init_state(1, cache="window", window=8).layers[0]
    assert (window.n_sink, window.window) == (0, 8)


def test_session_round_trip_mid_stream_continues_identically(tmp_path):
    model = _model(("mamba", "attention"))
    options = dict(cache="sinks", sinks=2, window=8)
    prompt = [1, 2, 3]
    whole = generate(model, prompt, 130, temperature=1.0, top_k=20, seed=5, state=model.init_state(1, **options))
    state = model.init_state(1, **options)
    first = generate(model, prompt, 100, temperature=1.0, top_k=20, seed=5, state=state)
    model.save_state(state, tmp_path / "s.safetensors")
    restored = model.load_state(tmp_path / "s.safetensors", **options)
    assert restored.layers[1].seq_len == state.layers[1].seq_len == 102
    rest = generate(model, torch.empty(1, 0, dtype=torch.long), 30, temperature=1.0, top_k=20, state=restored)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="keeps 2 sinks \\+ window 8; this one 4 \\+ 8"):
        model.load_state(tmp_path / "s.safetensors", cache="sinks", sinks=4, window=8)
    old_format = {k: v for k, v in state.layers[1].state_dict().items() if k != "format"}
    with pytest.raises(ValueError, match="keys before RoPE.*start a new session"):
        SinkKVCache(1, 2, 8).load_state_dict(old_format)
    dense = model.init_state(1)
    generate(model, prompt, 3, temperature=0, state=dense)
    model.save_state(dense, tmp_path / "dense.safetensors")
    with pytest.raises(ValueError, match="not a sink cache's"):
        model.load_state(tmp_path / "dense.safetensors", **options)


def test_sink_cache_streams_past_max_seq_len():
    model = _model(max_seq_len=16)
    out = generate(model, [1, 2, 3], 40, temperature=0, state=model.init_state(1, cache="sinks", sinks=4, window=12))
    assert out.shape == (1, 43)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [1, 2, 3], 40, temperature=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long), model.init_state(1))
    with pytest.raises(ValueError, match="keeps up to 20 positions, more than this model's limit of 16"):
        model.init_state(1, cache="sinks", sinks=4, window=16)


@pytest.mark.parametrize("options,match", [
    (dict(cache="sink"), "unknown cache policy 'sink'; choose one of dense, window, sinks"),
    (dict(cache="sinks", sinks=-1), "sinks must be an integer >= 0"),
    (dict(cache="sinks", window=0), "window must be an integer >= 1"),
    (dict(cache="window", window=0), "window must be an integer >= 1"),
])
def test_bad_cache_options(options, match):
    with pytest.raises(ValueError, match=match):
        _model().init_state(1, **options)


def test_prompt_longer_than_the_window_is_refused_and_pieces_work():
    """The model refuses a piece that would evict within itself; generate feeds pieces."""
    model = _model()
    state = model.init_state(1, cache="sinks", sinks=2, window=8)
    ids = torch.randint(0, 40, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"the prompt \(14 tokens\) is longer than the cache window.*"
                                             r"pieces of at most 10 tokens.*enlarge the window"):
            model(ids, state)
        model(ids[:, :10], state)
        with pytest.raises(ValueError, match="pieces of at most 1 tokens"):
            model(ids[:, 10:12], state)
        for t in range(10, 14):
            model(ids[:, t : t + 1], state)
    assert state.seq_len == 14 and state.layers[0].seq_len == 14
    # generate (prefill) feeds a longer prompt the same way: a piece that fits, then one at a time
    fed = model.init_state(1, cache="sinks", sinks=2, window=8)
    with torch.no_grad():
        for t in range(13):
            logits = model(ids[:, t : t + 1], fed)
    out = generate(model, ids[:, :13], 1, temperature=0, state=model.init_state(1, cache="sinks", sinks=2, window=8))
    assert out[0, -1] == logits[0, -1].argmax()


def test_refusals_dilated_learned_and_gradients():
    dilated = _model(("dilated", "attention"), dilated_segments=[4, 8], dilated_rates=[1, 2])
    with pytest.raises(ValueError, match="dilated attention layers take only cache='dense'.*'sinks'"):
        dilated.init_state(1, cache="sinks")
    assert type(dilated.init_state(1).layers[0]).__name__ == "KVCache"
    with pytest.raises(ValueError, match="pos = 'learned'"):
        _model(pos="learned", max_seq_len=32).init_state(1, cache="window", window=8)
    model = _model()
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(torch.tensor([[1, 2]]), model.init_state(1, cache="sinks"))

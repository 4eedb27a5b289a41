"""Streaming evaluation (longctx.eval.stream) against explicit references.

What the query of the newest token ``ids[t]`` attends to, at every layer, when scoring
``ids[t + 1]`` (``kept(t)`` = the first ``n_sink`` tokens and the last ``window`` of
``ids[: t + 1]``):

- dense: every token ``ids[: t + 1]``, at stream positions: one causal forward pass;
- sinks / window (window = sinks 0): the keys and values of ``kept(t)``, at positions
  ``0 .. len(kept) - 1``, each computed from that layer's input *as it was when the token
  was fed* (a cache keeps them, it never re-encodes): ``_cache_reference`` builds this layer
  by layer with the plain masked softmax; state-space layers carry the whole stream;
- recompute: a fresh forward pass over the last ``L = sinks + window`` tokens, positions
  ``0 .. L - 1``, every layer recomputed from those tokens alone: ``_forward_last``.

With one attention layer the cache's keys and values are functions of the token alone, so
sinks equals a fresh forward pass over exactly ``kept(t)``; with two layers it does not.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx.eval import applicable_policies, plot_stream, stream_compare, stream_nll, stream_table
from longctx.eval.stream import rss_bytes
from longctx.model import LanguageModel, ModelConfig
from longctx.ops.attention import attention_ref
from longctx.ops.rope import rope

SMALL = dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, mlp_hidden=48)
ATOL = 2e-5


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops on 2 threads of a shared machine spend most of their time waiting for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(layers=("attention", "attention"), **overrides):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(layers=list(layers), **{**SMALL, **overrides})).eval()


def _ids(n, seed=1):
    return torch.randint(0, SMALL["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


def _kept(t, n_sink, window):
    return list(range(min(n_sink, t + 1))) + list(range(max(n_sink, t + 1 - window), t + 1))


def _nll(logits, targets):
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def _forward_last(model, tokens):
    """Next-token logits after a fresh forward pass over ``tokens`` (positions from 0)."""
    return model(tokens[None])[0, -1]


@torch.no_grad()
def _cache_reference(model, ids, n_sink, window):
    """Logits ``(N - 1, vocab)`` of the sink (or window, ``n_sink = 0``) policy, layer by
    layer: a layer's input for token ``j`` depends only on tokens ``<= j`` (as when ``j`` was
    fed), and the query of token ``t`` attends to the keys/values of ``kept(t)`` computed
    from those inputs, RoPE at positions ``0 .. len(kept) - 1``, by the dense softmax."""
    n = len(ids) - 1
    h = model.embed(ids[None, :n])
    for block in model.blocks:
        x = block.mixer_norm(h)
        mixer = block.mixer
        if mixer.__class__.__name__ != "Attention":
            mixed = mixer(x)  # a state-space layer: the whole stream, causally
        else:
            q, k, v = mixer.qkv(x).split([mixer.n_heads * mixer.head_dim, *[mixer.n_kv_heads * mixer.head_dim] * 2], -1)
            q, k, v = (y.view(1, n, -1, mixer.head_dim) for y in (q, k, v))
            outs = []
            for t in range(n):
                kept = _kept(t, n_sink, window)
                qt, kt, vt = q[:, t : t + 1], k[:, kept], v[:, kept]
                if mixer.pos == "rope":
                    positions = torch.arange(len(kept))
                    qt, kt = rope(qt, positions[-1:], mixer.rope_theta), rope(kt, positions, mixer.rope_theta)
                outs.append(attention_ref(qt, kt, vt, causal=True, alibi_slopes=mixer.alibi_slopes)[0])
            mixed = mixer.out(torch.cat(outs, 1).reshape(1, n, -1))
        h = h + mixed
        if block.mlp is not None:
            h = h + block.mlp(block.mlp_norm(h))
    return model.lm_head(model.norm(h))[0]


@pytest.mark.parametrize("layers,pos", [
    (("attention", "attention"), "rope"), (("attention", "attention"), "alibi"), (("mamba", "attention"), "rope"),
])
def test_dense_equals_one_forward_pass(layers, pos):
    model = _model(layers, pos=pos)
    ids = _ids(40)
    result = stream_nll(model, ids, cache="dense", segment=16)
    with torch.no_grad():
        expected = _nll(model(ids[None])[0, :-1], ids[1:])
    assert result.nll.dtype == np.float32 and result.nll.shape == (39,)
    torch.testing.assert_close(torch.from_numpy(result.nll), expected, atol=ATOL, rtol=1e-5)
    assert result.stopped_at is None and result.span is None


@pytest.mark.parametrize("layers", [("attention", "attention"), ("mamba", "attention")])
def test_sinks_and_window_larger_than_the_stream_equal_dense(layers):
    model = _model(layers)
    ids = _ids(30)
    dense = stream_nll(model, ids, cache="dense").nll
    np.testing.assert_array_equal(stream_nll(model, ids, cache="sinks", sinks=4, window=30).nll, dense)
    np.testing.assert_array_equal(stream_nll(model, ids, cache="window", window=29).nll, dense)
    recall = stream_nll(model, ids, cache="recall", sinks=4, window=28, recall=dict(block=4))
    np.testing.assert_allclose(recall.nll, dense, rtol=0, atol=ATOL)


def test_recall_streams_past_its_window():
    model, ids = _model(), _ids(60)
    result = stream_nll(model, ids, cache="recall", sinks=2, window=8, recall=dict(block=4, topk=2, repr_tokens=2),
                        segment=20)
    assert result.tokens == 59 and np.isfinite(result.nll).all()
    assert (result.sinks, result.window, result.span) == (2, 8, 2 + 3 * 4 + 8)
    assert result.segments[-1].cache_bytes > result.segments[0].cache_bytes  # the blocks are kept
    with pytest.warns(UserWarning, match="recall=.* is ignored with cache='sinks'"):
        stream_nll(model, ids, cache="sinks", sinks=2, window=8, recall=dict(block=4))


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("cache,n_sink,window", [("sinks", 2, 6), ("sinks", 4, 3), ("window", 0, 7)])
def test_cache_policies_match_the_layerwise_reference(pos, cache, n_sink, window):
    model = _model(pos=pos)
    ids = _ids(45)
    options = dict(sinks=n_sink, window=window) if cache == "sinks" else dict(window=window)
    result = stream_nll(model, ids, cache=cache, segment=10, **options)
    expected = _nll(_cache_reference(model, ids, n_sink, window), ids[1:])
    torch.testing.assert_close(torch.from_numpy(result.nll), expected, atol=ATOL, rtol=1e-5)
    assert result.span == n_sink + window and result.sinks == n_sink and result.window == window


def test_hybrid_sinks_match_the_layerwise_reference():
    """The mamba layer keeps its state over the whole stream; attention keeps sinks + window."""
    model = _model(("mamba", "attention", "attention"))
    ids = _ids(30)
    result = stream_nll(model, ids, cache="sinks", sinks=2, window=5)
    expected = _nll(_cache_reference(model, ids, 2, 5), ids[1:])
    torch.testing.assert_close(torch.from_numpy(result.nll), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_one_layer_sinks_is_a_fresh_pass_over_the_kept_tokens_and_two_layers_are_not(pos):
    n_sink, window, ids = 2, 6, _ids(30)
    for layers in (("attention",), ("attention", "attention")):
        model = _model(layers, pos=pos)
        got = torch.from_numpy(stream_nll(model, ids, cache="sinks", sinks=n_sink, window=window).nll)
        fresh = torch.stack([_forward_last(model, ids[_kept(t, n_sink, window)]) for t in range(len(ids) - 1)])
        fresh = _nll(fresh, ids[1:])
        if len(layers) == 1:
            torch.testing.assert_close(got, fresh, atol=ATOL, rtol=1e-5)
        else:  # equal until the first eviction, different after
            torch.testing.assert_close(got[: n_sink + window], fresh[: n_sink + window], atol=ATOL, rtol=1e-5)
            assert (got - fresh)[n_sink + window :].abs().max() > 1e-3


@pytest.mark.parametrize("layers,pos,batch", [
    (("attention", "attention"), "rope", None), (("attention", "attention"), "alibi", 1),
    (("attention", "attention"), "learned", 4), (("mamba", "attention"), "rope", 3),
])
def test_recompute_matches_its_definition(layers, pos, batch):
    model = _model(layers, pos=pos, max_seq_len=64 if pos == "learned" else None)
    n_sink, window, ids = 3, 5, _ids(37)
    span = n_sink + window
    result = stream_nll(model, ids, cache="recompute", sinks=n_sink, window=window, segment=7, recompute_batch=batch)
    logits = torch.stack([_forward_last(model, ids[max(0, t - span + 1) : t + 1]) for t in range(len(ids) - 1)])
    torch.testing.assert_close(torch.from_numpy(result.nll), _nll(logits, ids[1:]), atol=ATOL, rtol=1e-5)
    assert result.span == span and all(s.cache_bytes == 0 for s in result.segments)


@pytest.mark.parametrize("every,batch", [(3, None), (4, 2)])
def test_recompute_every_kth_prediction(every, batch):
    """recompute_every=k gives the full recompute's value at every k-th prediction from
    L - 1 on (and at every prefix prediction), NaN elsewhere; the means skip the NaN."""
    model = _model()
    ids = _ids(41)
    full = stream_nll(model, ids, cache="recompute", sinks=2, window=5, segment=9).nll
    some = stream_nll(model, ids, cache="recompute", sinks=2, window=5, segment=9, recompute_batch=batch,
                      recompute_every=every)
    evaluated = [t for t in range(40) if t < 6 or t % every == 0]
    assert np.isfinite(some.nll).nonzero()[0].tolist() == evaluated and some.tokens == len(evaluated)
    np.testing.assert_allclose(some.nll[evaluated], full[evaluated], atol=ATOL, rtol=1e-5)
    assert some.mean_nll == pytest.approx(float(full[evaluated].astype(np.float64).mean()), rel=1e-6)
    assert some.notes == [f"recompute evaluated one prediction in {every} after the first 6"]


def test_segment_statistics_add_up():
    model = _model()
    ids = _ids(50)
    for cache in ("dense", "sinks", "recompute"):
        r = stream_nll(model, ids, cache=cache, sinks=2, window=6, segment=8) if cache != "dense" else \
            stream_nll(model, ids, cache=cache, segment=8)
        assert [(s.start, s.end) for s in r.segments] == [(i, min(i + 8, 49)) for i in range(0, 49, 8)]
        assert sum(s.tokens for s in r.segments) == r.tokens == 49
        weighted = sum(s.nll * s.tokens for s in r.segments) / r.tokens
        assert weighted == pytest.approx(r.mean_nll, rel=1e-9)
        assert r.mean_nll == pytest.approx(float(r.nll.astype(np.float64).mean()), rel=1e-12)
        assert r.ppl == pytest.approx(math.exp(r.mean_nll))
        for s in r.segments:
            assert s.nll == pytest.approx(float(r.nll[s.start : s.end].astype(np.float64).mean()), rel=1e-9)
            assert s.ppl == pytest.approx(math.exp(s.nll)) and s.ms_per_token > 0
        assert r.seconds == pytest.approx(sum(s.ms_per_token * s.tokens for s in r.segments) / 1e3, rel=1e-9)
        assert r.to_dict()["segments"][0]["end"] == 8 and "token_nll" in r.to_dict(include_nll=True)


def test_sinks_memory_stays_constant_over_many_windows_and_dense_grows():
    model = _model()
    ids = _ids(200)  # 20 windows
    sinks = stream_nll(model, ids, cache="sinks", sinks=2, window=8, segment=20)
    sizes = {s.cache_bytes for s in sinks.segments}
    # 2 layers x ((k, v) x storage of 2 * (2 + 8) positions + the 2 sinks' keys as first cached)
    # x 2 kv heads x head_dim 8 x fp32
    assert sizes == {2 * (2 * 20 + 2) * 2 * 8 * 4}
    rss = [s.rss_bytes for s in sinks.segments]
    if rss_bytes() is not None:  # Linux
        assert all(x > 0 for x in rss) and max(rss[1:]) - rss[1] < 16 * 2**20
    dense = stream_nll(model, ids, cache="dense", segment=20)
    grown = [s.cache_bytes for s in dense.segments]
    assert grown == sorted(grown) and grown[-1] > grown[0] >= 2 * 2 * 20 * 2 * 8 * 4


def test_dense_limit_error_and_stop():
    model = _model(max_seq_len=20)
    ids = _ids(30)
    with pytest.raises(ValueError, match=r"30 tokens.*feed 29.*position limit \(model.max_seq_len\) of 20.*"
                                         r"on_limit='stop'.*cache='sinks'"):
        stream_nll(model, ids, cache="dense")
    stopped = stream_nll(model, ids, cache="dense", on_limit="stop", segment=8)
    assert stopped.stopped_at == 20 and stopped.tokens == 20 and stopped.segments[-1].end == 20 and stopped.notes
    np.testing.assert_array_equal(stopped.nll, stream_nll(model, ids[:21], cache="dense", segment=8).nll)
    capped = stream_nll(_model(), ids, cache="dense", max_len=12, on_limit="stop")
    assert capped.stopped_at == 12 and capped.tokens == 12
    with pytest.raises(ValueError, match="more than max_len of 12"):
        stream_nll(_model(), ids, cache="dense", max_len=12)
    stream_nll(model, ids[:21], cache="dense")  # exactly 20 fed: fits
    # Bounded policies stream past max_seq_len.
    assert stream_nll(model, ids, cache="sinks", sinks=2, window=10).tokens == 29
    assert stream_nll(model, ids, cache="recompute", sinks=2, window=10).tokens == 29


@pytest.mark.parametrize("options,match", [
    (dict(cache="sink"), "unknown stream policy 'sink'"),
    (dict(cache="sinks", sinks=-1), "sinks must be an integer >= 0"),
    (dict(cache="sinks", window=0), "window must be an integer >= 1"),
    (dict(cache="window", window=0), "window must be an integer >= 1"),
    (dict(cache="recompute", sinks=2, window=0), "window must be an integer >= 1"),
    (dict(cache="recompute", sinks=-2, window=3), "sinks must be an integer >= 0"),
    (dict(cache="sinks", sinks=4, window=20), "keeps up to 24 positions, more than this model's limit of 20"),
    (dict(cache="recompute", sinks=4, window=20), "recompute re-encodes windows of sinks \\+ window = 24 tokens"),
    (dict(cache="state"), "cache='state' is for models without attention layers"),
    (dict(cache="dense", segment=0), "segment must be a positive integer"),
    (dict(cache="dense", on_limit="truncate"), "on_limit must be one of error, stop"),
    (dict(cache="recompute", recompute_batch=0), "recompute_batch must be a positive integer"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        stream_nll(_model(max_seq_len=20), _ids(10), **options)


def test_bad_streams_and_models():
    model = _model()
    with pytest.raises(ValueError, match="one sequence of token ids"):
        stream_nll(model, torch.zeros(2, 5, dtype=torch.long), cache="dense")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        stream_nll(model, [3], cache="dense")
    with pytest.raises(ValueError, match=r"token id 99 is outside the vocabulary \(0..39\)"):
        stream_nll(model, [1, 2, 99], cache="dense")  # the last token is only predicted, never fed
    with pytest.raises(ValueError, match="must be integers"):
        stream_nll(model, [1.0, 2.0], cache="dense")
    with pytest.raises(ValueError, match="pos = 'learned'"):
        stream_nll(_model(pos="learned", max_seq_len=32), _ids(10), cache="sinks", sinks=2, window=4)
    dilated = _model(("dilated", "attention"), dilated_segments=[4, 8], dilated_rates=[1, 2])
    with pytest.raises(ValueError, match="dilated attention layers take only cache='dense'"):
        stream_nll(dilated, _ids(10), cache="window", window=4)
    assert applicable_policies(dilated) == ("dense", "recompute")
    assert applicable_policies(model) == ("dense", "window", "sinks", "recall", "recompute")


def test_model_without_attention_takes_the_state_policy_only():
    model = _model(("mamba", "mamba"))
    ids = _ids(25)
    assert applicable_policies(model) == ("state",)
    for cache in ("dense", "sinks", "window", "recompute"):
        with pytest.raises(ValueError, match=rf"no attention layers \(mamba\), so the cache policy '{cache}' does not "
                                             r"apply; use cache='state'"):
            stream_nll(model, ids, cache=cache)
    result = stream_nll(model, ids, cache="state", segment=10)
    with torch.no_grad():
        expected = _nll(model(ids[None])[0, :-1], ids[1:])
    torch.testing.assert_close(torch.from_numpy(result.nll), expected, atol=1e-4, rtol=1e-4)
    assert len({s.cache_bytes for s in result.segments}) == 1 and result.segments[0].cache_bytes > 0
    assert list(stream_compare(model, ids)) == ["state"]


def test_ignored_options_warn_and_training_mode_is_restored():
    model = _model().train()
    with pytest.warns(UserWarning, match="window=8 is ignored with cache='dense'"):
        stream_nll(model, _ids(10), cache="dense", window=8)
    with pytest.warns(UserWarning, match="sinks=2 is ignored with cache='window'"):
        stream_nll(model, _ids(10), cache="window", sinks=2, window=4)
    with pytest.warns(UserWarning, match="max_len=8 caps the dense cache only"):
        stream_nll(model, _ids(10), cache="sinks", max_len=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream_nll(model, _ids(10), cache="sinks", sinks=2, window=4)
    assert model.training


def test_compare_table_and_plot(tmp_path):
    model = _model(max_seq_len=24)
    ids = _ids(40)
    results = stream_compare(model, ids, sinks=2, window=6, segment=10)
    assert list(results) == ["dense", "window", "sinks", "recompute"]
    assert results["dense"].stopped_at == 24 and results["sinks"].tokens == 39
    assert {name: r.span for name, r in results.items()} == {"dense": None, "window": 8, "sinks": 8, "recompute": 8}
    np.testing.assert_array_equal(results["window"].nll, stream_nll(model, ids, cache="window", window=8, segment=10).nll)
    md = stream_table(results)
    lines = md.splitlines()
    assert lines[0] == "| tokens | policy | ppl | nll | ms/token | RSS MiB | cache MiB |"
    assert len(lines) == 2 + (3 + 4 * 3) + 4  # dense stops after 3 segments; 4 summary rows
    assert f"| all 39 | sinks | {results['sinks'].ppl:.4g} |" in md
    text = stream_table(results, fmt="text")
    assert text.splitlines()[1].startswith("---") and "recompute" in text
    with pytest.raises(ValueError, match="fmt must be"):
        stream_table(results, fmt="html")
    path = plot_stream(results, tmp_path / "stream.png")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_stream(results, tmp_path / "ppl.png", timing=False, memory=False).is_file()


def test_compare_stops_dense_at_the_trained_length_and_pairs_subsampled_positions():
    """Without max_len, dense stops at config.context_len (a RoPE model has no position limit
    of its own); a policy evaluated every k-th position gets rows comparing every policy on
    exactly those positions."""
    model = _model()
    model.config.context_len = 20
    ids = _ids(41)
    results = stream_compare(model, ids, ["dense", "sinks", "recompute"], sinks=2, window=5, segment=10,
                             recompute_every=4)
    assert results["dense"].stopped_at == 20 and results["sinks"].tokens == 40
    picked = np.isfinite(results["recompute"].nll)
    md = stream_table(results)
    for name, r in results.items():
        n = min(r.nll.size, picked.size)
        mean = float(r.nll[:n][picked[:n]].astype(np.float64).mean())
        count = int(picked[:n].sum())
        assert f"| {count} of recompute | {name} | {math.exp(mean):.4g} | {mean:.4g} | - | - | - |" in md
    assert stream_compare(model, ids, ["dense"], max_len=30)["dense"].stopped_at == 30

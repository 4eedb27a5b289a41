"""Memory tokens (RMT): one segment is the plain model with the memory prepended and the
write slots appended; memory carries across segments with BPTT as configured; streaming
through a state (saved, restored, forked mid-segment) equals one pass; bad configs fail."""

import pytest
import torch

from longctx.generation.generate import generate
from longctx.model import LanguageModel, ModelConfig
from longctx.model.config import ConfigError
from longctx.model.hf import HFCheckpointError, to_hf

MEM_ID = 260
M, S = 3, 5
BASE = dict(vocab_size=264, d_model=32, n_heads=2, mlp_hidden=64, special_tokens={"mem": MEM_ID})
VARIANTS = {
    "attention": dict(layers=["attention", "attention"]),
    "hybrid": dict(layers=["mamba", "attention"], ssm_state=4),
    "learned": dict(layers=["attention", "attention"], pos="learned", max_seq_len=S + 2 * M),
}


def memory_model(variant="attention", **overrides):
    torch.manual_seed(0)
    values = {**BASE, **VARIANTS[variant], "memory_tokens": M, "memory_segment": S, **overrides}
    return LanguageModel(ModelConfig(**values)).eval()


def ids_of(batch, time, seed=1):
    return torch.randint(0, 256, (batch, time), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_segment_is_the_plain_model_with_memory_around_it(variant):
    model = memory_model(variant)
    plain = LanguageModel(ModelConfig(**{**BASE, **VARIANTS[variant]}))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "memory.init"})
    # Ids 256..258 of the plain model embed the memory model's initial memory.
    with torch.no_grad():
        plain.embed.weight[256 : 256 + M] = model.memory.init
    ids = ids_of(2, S)
    prompt = torch.cat([torch.arange(256, 256 + M).expand(2, M), ids, torch.full((2, M), MEM_ID)], 1)
    other = torch.ones(264, dtype=torch.bool)
    other[256 : 256 + M] = False  # the tied LM head's rows for those ids differ
    with torch.no_grad():
        expected = plain(prompt)[:, M : M + S, other]
        torch.testing.assert_close(model(ids)[..., other], expected)
        torch.testing.assert_close(model(ids[:, :3])[..., other], expected[:, :3])  # a partial segment: no write


def reference(model, ids):
    """Segments by hand through the blocks: [memory, tokens, write slots]."""
    memory = model.memory.init.expand(ids.shape[0], -1, -1)
    outs = []
    for seg in ids.split(S, 1):
        x = torch.cat([memory, model.embed(seg), model.embed(torch.full((ids.shape[0], M), MEM_ID))], 1)
        if model.pos_embed is not None:
            x = x + model.pos_embed(torch.arange(x.shape[1]))
        for block in model.blocks:
            x = block(x)
        outs.append(x[:, M : M + seg.shape[1]])
        memory = x[:, -M:]
    return model.lm_head(model.norm(torch.cat(outs, 1)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_segments_pass_the_memory_on(variant):
    model = memory_model(variant)
    ids = ids_of(2, 3 * S + 2)
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(logits, reference(model, ids))
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 256
        # Segment 2 sees segment 1 through the memory only, and it does.
        assert not torch.allclose(model(changed)[:, S:], logits[:, S:])


def embeddings_and_logits(model, ids):
    """The logits, and every output of the embedding (segments' tokens and write slots) with
    its gradient kept."""
    embedded = []

    def keep(module, args, out):
        out.retain_grad()
        embedded.append(out)

    handle = model.embed.register_forward_hook(keep)
    try:
        return embedded, model(ids)
    finally:
        handle.remove()


@pytest.mark.parametrize("bptt, flows", [(1, False), (2, True), (None, True)])
def test_bptt_gradients_cross_segments(bptt, flows):
    model = memory_model(memory_bptt=bptt).train()
    embedded, logits = embeddings_and_logits(model, ids_of(1, 2 * S))
    logits[:, S:].square().sum().backward()  # segment 2's loss only
    first = embedded[0]  # segment 1's token embeddings
    assert first.shape[1] == S
    grad = first.grad
    if flows:
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or not grad.any()


def test_bptt_detaches_every_bptt_segments():
    model = memory_model(memory_bptt=2).train()
    embedded, logits = embeddings_and_logits(model, ids_of(1, 4 * S))
    # Segments 1-2 and 3-4 are the blocks: segment 4's loss reaches segment 3, not 1 or 2.
    logits[:, 3 * S :].sum().backward()
    tokens = [e for e in embedded if e.shape[1] == S]
    assert [t.grad is not None and bool(t.grad.any()) for t in tokens] == [False, False, True, True]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pieces", [[1] * 18, [3, 7, 1, 7], [18]])
def test_streaming_equals_one_pass(variant, pieces):
    model = memory_model(variant)
    ids = ids_of(2, sum(pieces))
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(2)
        outs, fed = [], 0
        for n in pieces:
            outs.append(model(ids[:, fed : fed + n], state))
            fed += n
    torch.testing.assert_close(torch.cat(outs, 1), full)
    assert state.seq_len == ids.shape[1] and state.memory.pos == ids.shape[1] % S
    assert all(s.seq_len <= S + 2 * M for s in state.layers)


@pytest.mark.parametrize("cut", [7, 2 * S])  # mid-segment, and at a boundary (caches emptied)
def test_save_restore_fork_continue_exactly(tmp_path, cut):
    model = memory_model("hybrid")
    ids = ids_of(1, 4 * S)
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(1)
        model(ids[:, :cut], state)
        path = tmp_path / "session.safetensors"
        model.save_state(state, path)
        restored = model.load_state(path)
        fork = state.fork()
        for s in (state, restored, fork):
            torch.testing.assert_close(model(ids[:, cut:], s), full[:, cut:])
        state.reset()
        torch.testing.assert_close(model(ids, state), full)


def test_generate_through_the_state_is_greedy_decoding():
    model = memory_model()
    prompt = ids_of(1, 4)
    out = generate(model, prompt, 2 * S, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(2 * S):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("overrides, match", [
    (dict(memory_tokens=-1), "memory_tokens must be an integer >= 0"),
    (dict(memory_segment=None), "needs model.memory_segment"),
    (dict(memory_segment=0), "memory_segment must be a positive integer"),
    (dict(memory_bptt=0), "memory_bptt must be a positive integer or None"),
    (dict(special_tokens={}), "needs the <mem> token"),
    (dict(sink_token=True), "use one of them"),
    (dict(max_seq_len=S + 2 * M - 1), "a segment spans 11 positions"),
])
def test_bad_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**BASE, **VARIANTS["attention"], "memory_tokens": M, "memory_segment": S, **overrides})


def test_segment_settings_without_memory_warn():
    with pytest.warns(UserWarning, match="memory_segment ignored"):
        ModelConfig(**BASE, memory_segment=8)


def test_refusals(tmp_path):
    model = memory_model()
    with pytest.raises(ValueError, match="cache='dense'"):
        model.init_state(1, cache="recall")
    state = model.init_state(1)
    with pytest.raises(ValueError, match="speculative decoding"):
        state.rewind(0)
    with pytest.raises(ValueError, match="backspace decoding"):
        state.keep_undo()
    with pytest.raises(HFCheckpointError, match="memory_tokens"):
        to_hf(model, tmp_path / "hf")
    plain = LanguageModel(ModelConfig(**{**BASE, **VARIANTS["attention"]}))
    with torch.no_grad():
        model(ids_of(1, 2), state)
    with pytest.raises(ValueError, match="memory-token state"):
        plain.init_state(1).load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="has no memory"):
        model(ids_of(1, 2), plain.init_state(1))


def test_cost_per_token_is_that_of_a_segment_however_long_the_input():
    model = memory_model()
    assert model.flops_per_token(10 * S) == pytest.approx(model.flops_per_token(1000 * S))
    plain = LanguageModel(ModelConfig(**{**BASE, **VARIANTS["attention"]}))
    assert model.flops_per_token(1000 * S) < plain.flops_per_token(1000 * S)


# Memory over a rolling window: sink caches whose sinks are the memory.

def feed(model, ids, state, pieces):
    outs, fed = [], 0
    with torch.no_grad():
        for n in pieces:
            outs.append(model(ids[:, fed : fed + n], state))
            fed += n
    return torch.cat(outs, 1)


def test_rolling_window_in_the_first_segment_is_streamingllm_with_the_memory_as_sinks():
    model = memory_model(memory_segment=20)
    plain = LanguageModel(ModelConfig(**{**BASE, **VARIANTS["attention"]})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "memory.init"})
    with torch.no_grad():
        plain.embed.weight[256 : 256 + M] = model.memory.init
    ids = ids_of(1, 12)  # evicts: 3 sinks + a window of 4
    rolling = feed(model, ids, model.init_state(1, cache="sinks", window=4), [1] * 12)
    state = plain.init_state(1, cache="sinks", sinks=M, window=4)
    feed(plain, torch.arange(256, 256 + M)[None], state, [M])
    expected = feed(plain, ids, state, [1] * 12)
    other = torch.ones(264, dtype=torch.bool)
    other[256 : 256 + M] = False
    torch.testing.assert_close(rolling[..., other], expected[..., other])


def test_rolling_window_holding_the_segment_writes_the_segment_models_memory():
    model = memory_model()
    ids = ids_of(2, S + 1)
    dense, rolling = model.init_state(2), model.init_state(2, cache="sinks", window=S + M)
    torch.testing.assert_close(feed(model, ids[:, :S], rolling, [2, 3]), feed(model, ids[:, :S], dense, [S]))
    torch.testing.assert_close(rolling.memory.memory, dense.memory.memory)
    # The sinks are now the new memory: the next token sees it, and differs from the dense
    # model's only by also seeing the last segment's tokens in the window.
    assert not torch.allclose(feed(model, ids[:, S:], rolling, [1]), feed(model, ids[:, S:], dense, [1]))


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("pieces", [[3, 1, 2, 4, 1, 7], [4] * 4 + [2]])
def test_rolling_window_streaming_equals_token_by_token(pos, pieces):
    model = memory_model(pos=pos)
    ids = ids_of(2, sum(pieces))
    one_by_one = feed(model, ids, model.init_state(2, cache="sinks", window=4), [1] * ids.shape[1])
    state = model.init_state(2, cache="sinks", window=4)
    torch.testing.assert_close(feed(model, ids, state, pieces), one_by_one)
    assert state.memory.segments == ids.shape[1] // S and all(s.seq_len == ids.shape[1] + M for s in state.layers)


def test_rolling_window_save_restore_fork_and_generate(tmp_path):
    model = memory_model()
    ids = ids_of(1, 4 * S)
    full = feed(model, ids, model.init_state(1, cache="sinks", window=4), [1] * ids.shape[1])
    state = model.init_state(1, cache="sinks", window=4)
    feed(model, ids[:, :7], state, [1] * 7)
    model.save_state(state, tmp_path / "s.safetensors")
    for s in (model.load_state(tmp_path / "s.safetensors", cache="sinks", window=4), state.fork(), state):
        torch.testing.assert_close(feed(model, ids[:, 7:], s, [1] * (ids.shape[1] - 7)), full[:, 7:])
    out = generate(model, ids[:, :4], 2 * S, temperature=0.0, state=model.init_state(1, cache="sinks", window=4))
    greedy = model.init_state(1, cache="sinks", window=4)
    seq, logits = ids[:, :4], feed(model, ids[:, :4], greedy, [4])
    for _ in range(2 * S):
        token = logits[:, -1:].argmax(-1)
        seq, logits = torch.cat([seq, token], 1), feed(model, token, greedy, [1])
    assert torch.equal(out, seq)


def test_rolling_window_refusals():
    with pytest.raises(ValueError, match="cache='dense' .* or cache='sinks'"):
        memory_model().init_state(1, cache="window")
    with pytest.raises(ValueError, match="sinks must be 3"):
        memory_model().init_state(1, cache="sinks", sinks=4)
    with pytest.raises(ValueError, match="attention layers only; this one has mamba"):
        memory_model("hybrid").init_state(1, cache="sinks")


@pytest.mark.parametrize("window", [4, 20])  # evicting, and not yet
def test_rolling_window_sinks_become_the_written_memory(window):
    model = memory_model()
    state = model.init_state(1, cache="sinks", window=window)
    feed(model, ids_of(1, S + 2), state, [1] * (S + 2))  # a segment ended, and the window rolled on
    # The memory alone, through the plain model's dense caches: ids 256.. embed it.
    plain = LanguageModel(ModelConfig(**{**BASE, **VARIANTS["attention"]})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "memory.init"})
    with torch.no_grad():
        plain.embed.weight[256 : 256 + M] = state.memory.memory[0]
    dense = plain.init_state(1)
    feed(plain, torch.arange(256, 256 + M)[None], dense, [M])
    for cache, ref in zip(state.layers, dense.layers):
        saved, expected = cache.state_dict(), ref.state_dict()  # sinks as first cached
        torch.testing.assert_close(saved["kept_k"][:, :M], expected["k"])
        torch.testing.assert_close(saved["kept_v"][:, :M], expected["v"])


def test_stream_eval_runs_through_the_memory():
    from longctx.eval.stream import stream_nll

    model = memory_model()
    ids = ids_of(1, 4 * S)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="none")
    dense = stream_nll(model, ids[0], cache="dense", segment=S)
    torch.testing.assert_close(torch.from_numpy(dense.nll), expected)
    rolling = stream_nll(model, ids[0], cache="sinks", sinks=M, window=4, segment=S)
    assert rolling.nll.shape == dense.nll.shape and torch.isfinite(torch.from_numpy(rolling.nll)).all()


def test_memory_state_refuses_what_does_not_fit():
    model = memory_model()
    state = model.init_state(2)
    with torch.no_grad():
        model(ids_of(2, S + 1), state)
    saved = state.state_dict()
    with pytest.raises(ValueError, match="batch 2 and 3 memory tokens; this state has batch 1"):
        model.init_state(1).memory.load_state_dict({k[7:]: v for k, v in saved.items() if k.startswith("memory.")})
    plain = LanguageModel(ModelConfig(**{**BASE, **VARIANTS["attention"]}))
    with pytest.raises(ValueError, match="has no memory-token state; this model has memory tokens"):
        model.init_state(1).load_state_dict(plain.init_state(1).state_dict())

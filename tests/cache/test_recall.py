"""The recall cache (sinks + window + retrievable blocks): equal to dense attention until
tokens leave the window, retrieval of the block that holds a planted key, sessions that
save, restore and fork, clear errors, and a disk store that never reads a torn block."""

import json

import pytest
import torch

from longctx.cache.recall import BlockStore, RecallCache
from longctx.generation import generate
from longctx.model import LanguageModel, ModelConfig

SMALL = dict(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden=96)
RECALL = dict(cache="recall", sinks=3, window=24, block=8, topk=2, repr_tokens=2)
G = torch.Generator().manual_seed(0)


def _model(pos="rope", layers=("attention", "attention"), **overrides):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(layers=list(layers), pos=pos, **SMALL, **overrides)).eval()


@pytest.mark.parametrize("pos", ["rope", "alibi", "none"])
@pytest.mark.parametrize("pieces", [[27], [5, 13, 9], [1] * 27])
def test_equals_dense_attention_until_tokens_leave_the_window(pos, pieces):
    """27 tokens fit in 3 sinks + a window of 24: recall is dense attention, fed in any pieces."""
    model = _model(pos)
    ids = torch.randint(0, 64, (2, sum(pieces)), generator=G)
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(2, **RECALL)
        start, outs = 0, []
        for n in pieces:
            outs.append(model(ids[:, start : start + n], state))
            start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)
    assert not state.layers[0].split
    # One token more and the attention splits: the result is no longer the dense one.
    with torch.no_grad():
        more = model(torch.randint(0, 64, (2, 12), generator=G), state)
    assert state.layers[0].split and more.shape == (2, 12, 64)


def test_a_long_input_goes_through_the_model_in_pieces_as_in_one_pass(monkeypatch):
    """The model feeds pieces of RECALL_PIECE tokens, a multiple of the layers' CHUNK: each
    layer sees the chunks of one pass, so the logits are those of one pass."""
    model = _model()
    ids = torch.randint(0, 64, (1, 70), generator=G)
    monkeypatch.setattr("longctx.layers.recall.CHUNK", 8)
    with torch.no_grad():
        whole = model(ids, model.init_state(1, **RECALL))
        monkeypatch.setattr("longctx.model.lm.RECALL_PIECE", 16)
        pieces = model(ids, model.init_state(1, **RECALL))
        last = model(ids, model.init_state(1, **RECALL), last_only=True)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(last, whole[:, -1:], rtol=0, atol=1e-5)


def test_policy_refusals_and_a_memory_directory_per_layer(tmp_path):
    with pytest.raises(ValueError, match="pos = 'learned'"):
        _model("learned", max_seq_len=64).init_state(1, **RECALL)
    with pytest.raises(ValueError, match="positions='ordered' the distances differ per key"):
        _model("alibi").init_state(1, **RECALL, positions="ordered")
    with pytest.raises(ValueError, match="block, topk apply to cache='recall' only"):
        _model().init_state(1, cache="sinks", block=8, topk=2)
    with pytest.raises(ValueError, match=r"up to 75 tokens .*more than the 64 .*retrieve at most 3 blocks"):
        _model(context_len=64).init_state(1, **{**RECALL, "topk": 5})  # 3 sinks + 6 blocks of 8 + 24
    _model(context_len=64).init_state(1, **{**RECALL, "topk": 3})
    with pytest.raises(ValueError, match=r"reaches back up to 536 positions .*attention window of 256"):
        _model(attn_window=256).init_state(1, **RECALL)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not writable"):  # at once, not when the first block leaves
        _model().init_state(1, **RECALL, memory_dir=str(blocker / "mem"))
    model, ids = _model(), torch.randint(0, 64, (1, 60), generator=G)
    disk, ram = model.init_state(1, **RECALL, memory_dir=str(tmp_path / "mem")), model.init_state(1, **RECALL)
    with torch.no_grad():
        model(ids, disk)
        model(ids, ram)
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["layer_0", "layer_1"]
    assert [BlockStore.open(tmp_path / "mem" / f"layer_{i}").count for i in (0, 1)] == [4, 4]  # (60 - 3 - 24) // 8
    # In RAM the store holds room for 16 blocks of keys and values (1 x 8 x 2 x 16 fp32 each).
    assert ram.nbytes - disk.nbytes == 2 * 2 * 16 * 8 * 2 * 16 * 4


def test_retrieval_finds_the_block_with_a_planted_key():
    cache = RecallCache(1, n_sink=2, window=8, block=4, topk=1, repr_tokens=2)
    kv_heads, dim = 2, 16
    key = torch.zeros(dim)
    key[3] = 5.0
    for t in range(40):  # 2 sinks, then blocks of 4 leave the window from token 10 on
        k = 0.1 * torch.randn(1, 1, kv_heads, dim, generator=G)
        if 18 <= t < 22:  # the tokens of block 4 (tokens 2-5, 6-9, ... are blocks 0, 1, ...)
            k = k + key
        cache.add(k, k, torch.randn(1, 1, kv_heads, dim, generator=G), None)
    assert cache.blocks == 7 and cache.split
    query = key.expand(1, kv_heads, dim)
    assert cache.retrieve(query).tolist() == [[4]]
    k, _ = cache.global_kv(query)  # sinks, the planted block, the pending tokens
    assert k.shape[1] == 2 + 4 + (40 - 2 - 8 - 7 * 4)
    torch.testing.assert_close(k[0, 2:6].mean((0, 1)), key, atol=0.2, rtol=0)


def test_representatives_are_the_most_attended_tokens():
    cache = RecallCache(1, n_sink=0, window=4, block=4, topk=1, repr_tokens=1)
    keys = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1, 1).expand(1, 8, 1, 2)
    received = torch.zeros(1, 8, 1)
    received[0, 2] = 1.0  # token 2 got the attention
    cache.add(keys, keys, keys, None)  # 8 tokens: the first 4 leave the window as one block
    assert cache.blocks == 1
    cache.reset()
    cache.add(keys[:, :4], keys[:, :4], keys[:, :4], None)
    cache.add(keys[:, 4:], keys[:, 4:], keys[:, 4:], received)
    torch.testing.assert_close(cache.reprs[0, 0, 0], torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("on_disk", [False, True])
def test_save_restore_and_fork_mid_stream_continue_exactly(tmp_path, on_disk):
    model = _model()
    memory = {"memory_dir": str(tmp_path / "mem")} if on_disk else {}
    prompt = torch.randint(0, 64, (1, 50), generator=G)
    whole = generate(model, prompt, 30, temperature=1.0, seed=3, state=model.init_state(1, **RECALL, **memory))
    state = model.init_state(1, **RECALL, **({"memory_dir": str(tmp_path / "mem2")} if on_disk else {}))
    first = generate(model, prompt, 12, temperature=1.0, seed=3, state=state)
    assert state.layers[0].blocks > 0
    model.save_state(state, tmp_path / "s.safetensors")
    options = {"memory_dir": str(tmp_path / "restored")} if on_disk else {}
    restored = model.load_state(tmp_path / "s.safetensors", **RECALL, **options)
    empty = torch.empty(1, 0, dtype=torch.long)
    rest = generate(model, empty, 18, temperature=1.0, state=restored)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=0, atol=0)
    if not on_disk:
        fork = state.fork()
        torch.testing.assert_close(generate(model, empty, 18, temperature=1.0, state=fork), rest, rtol=0, atol=0)


@pytest.mark.parametrize("options,match", [
    (dict(block=0), "block size must be a positive integer"),
    (dict(window=4, block=8), r"window \(4\) is smaller than a block \(8\)"),
    (dict(topk=0), "blocks retrieved .topk. must be a positive integer"),
    (dict(repr_tokens=9, block=8), "9 representative tokens per block of 8"),
    (dict(positions="random"), "unknown recall position scheme 'random'"),
])
def test_bad_parameters_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        RecallCache(1, **{**dict(n_sink=4, window=64, block=8, topk=4, repr_tokens=2), **options})


def test_an_unwritable_memory_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not writable.*choose another --memory-dir"):
        BlockStore((1, 4, 2, 8), torch.float32, blocker / "mem")


def test_disk_store_never_reads_a_torn_block(tmp_path):
    """A block counts once count.json says so: data written without its count (a crash
    before the rename) is not read back, and a torn temporary count changes nothing."""
    store = BlockStore((1, 4, 2, 8), torch.float32, tmp_path)
    blocks = [torch.randn(1, 4, 2, 8, generator=G) for _ in range(3)]
    for b in blocks[:2]:
        store.append(b, -b)
    store._k[2] = 99.0  # the third block's data reached the file, its count did not
    store._k.flush()
    (tmp_path / ".count.json.tmp").write_text('{"count": 3, "cap')  # a torn write of the next count
    reopened = BlockStore.open(tmp_path)
    assert reopened.count == 2 and json.loads((tmp_path / "count.json").read_text())["count"] == 2
    k, v = reopened.read()
    torch.testing.assert_close(k, torch.stack(blocks[:2]))
    torch.testing.assert_close(v, -torch.stack(blocks[:2]))

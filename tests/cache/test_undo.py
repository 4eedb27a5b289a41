"""One-step undo of every state type (backspace decoding): feeding a token and undoing it
gives the same state, and the same next logits, as never having fed it."""

import pytest
import torch

from longctx.model import LanguageModel, ModelConfig

SMALL = dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, mlp_hidden=0)
LENGTH = 30  # tokens stepped through; the caches below evict from token 8 on

CASES = {
    "dense": (["attention", "attention"], {}, {}),
    "dense, attention window": (["attention", "attention"], {"attn_window": 4}, {}),
    "sinks": (["attention", "attention"], {}, {"cache": "sinks", "sinks": 2, "window": 6}),
    "sinks, no positions": (["attention", "attention"], {"pos": "none"}, {"cache": "sinks", "sinks": 2, "window": 6}),
    "sinks, alibi": (["attention", "attention"], {"pos": "alibi"}, {"cache": "sinks", "sinks": 1, "window": 7}),
    "window": (["attention", "attention"], {}, {"cache": "window", "window": 6}),
    "mamba": (["mamba", "mamba"], {}, {}),
    "mamba2": (["mamba2"], {"ssm_head_dim": 16, "ssm_chunk": 8}, {}),
    "hybrid, sinks": (["mamba", "attention"], {}, {"cache": "sinks", "sinks": 2, "window": 6}),
}


def _model(layers, overrides):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(layers=layers, **{**SMALL, **overrides})).eval()


def _assert_same_state(a, b):
    da, db = a.state_dict(), b.state_dict()
    assert sorted(da) == sorted(db)
    for name in da:
        torch.testing.assert_close(da[name], db[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_undo_equals_never_fed(case):
    layers, overrides, cache = CASES[case]
    model = _model(layers, overrides)
    tokens = torch.randint(0, 40, (1, LENGTH + 1), generator=torch.Generator().manual_seed(1))
    wrong = (tokens + 7) % 40  # the token fed and taken back
    reference = model.init_state(1, **cache)
    model(tokens[:, :3], reference)  # a prompt, in one update
    for p in range(3, LENGTH):
        undone = reference.fork()
        undone.keep_undo()
        model(wrong[:, p : p + 1], undone)
        undone.undo_step()
        assert undone.seq_len == reference.seq_len == p
        _assert_same_state(undone, reference)
        # Both continue alike: the next token's logits and the state after it.
        got = model(tokens[:, p : p + 1], undone)
        expected = model(tokens[:, p : p + 1], reference)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        _assert_same_state(undone, reference)


@pytest.mark.parametrize("case", ["dense", "sinks", "mamba"])
@torch.no_grad()
def test_undo_keeps_one_step_only(case):
    layers, overrides, cache = CASES[case]
    model = _model(layers, overrides)
    state = model.init_state(1, **cache)
    state.keep_undo()
    with pytest.raises(ValueError, match="no step to undo"):
        state.undo_step()
    model(torch.tensor([[1, 2, 3]]), state)
    model(torch.tensor([[4]]), state)
    state.undo_step()
    with pytest.raises(ValueError, match="no step to undo"):
        state.undo_step()
    # A restored (or forked) state starts without history.
    fork = state.fork()
    fork.keep_undo()
    with pytest.raises(ValueError, match="no step to undo"):
        fork.undo_step()


@torch.no_grad()
def test_undo_of_the_first_step_is_a_fresh_state():
    model = _model(["attention", "mamba"], {})
    state = model.init_state(1, cache="sinks", sinks=2, window=6)
    state.keep_undo()
    model(torch.tensor([[5]]), state)
    state.undo_step()
    assert state.seq_len == 0
    _assert_same_state(state, model.init_state(1, cache="sinks", sinks=2, window=6))


def test_recall_cache_refuses_undo():
    model = _model(["attention"], {})
    state = model.init_state(1, cache="recall", sinks=2, window=8, block=4, topk=1, repr_tokens=1)
    with pytest.raises(ValueError, match="RecallCache cannot take back .* backspace decoding"):
        state.keep_undo()


@torch.no_grad()
def test_undo_after_a_fast_decoding_step():
    from longctx.generation.fast_decode import fast_decoder

    model = _model(["attention", "attention"], {"mlp_hidden": 64})
    reference = model.init_state(1)
    model(torch.tensor([[1, 2, 3, 4, 5]]), reference)
    undone = reference.fork()
    undone.keep_undo()
    step = fast_decoder(model, undone)
    assert step is not None  # the numba path, which updates the caches itself
    step(torch.tensor([[9]]))
    undone.undo_step()
    _assert_same_state(undone, reference)
    torch.testing.assert_close(step(torch.tensor([[6]])), model(torch.tensor([[6]]), reference)[:, -1],
                               rtol=1e-5, atol=1e-5)

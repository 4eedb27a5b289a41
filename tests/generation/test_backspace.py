"""Backspace decoding: on every state type, decoding with rollback equals a decoder that
recomputes each step from a fresh state over the prompt and the answer so far (a deleted
token is as if never fed); the masking rules; refusals."""

import pytest
import torch

from longctx.generation import prefill
from longctx.generation.backspace import (
    apply_backspaces,
    generate_with_backspace,
    stream_with_backspace,
)
from longctx.model import LanguageModel, ModelConfig
from longctx.model.config import ConfigError

V, BS = 40, 39  # vocabulary and the backspace id of these tests
SMALL = dict(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, mlp_hidden=0)
PROMPT = [3, 14, 15, 9]


class Scripted(LanguageModel):
    """A random model steered by its input: after token x it prefers (x + 3) mod 39, and after
    a multiple of 5 (a "mistake") a backspace, so decoding deletes often."""

    def forward(self, ids, state=None, *, last_only=False):
        logits = super().forward(ids, state, last_only=last_only)
        x = ids[:, -logits.shape[1] :]
        steer = torch.nn.functional.one_hot((x + 3) % (V - 1), V).float() * 10
        steer[..., BS] = 100.0 * (x % 5 == 0)
        return logits + steer


def _model(layers, **overrides):
    torch.manual_seed(0)
    return Scripted(ModelConfig(layers=layers, **{**SMALL, **overrides}, special_tokens={"backspace": BS})).eval()


@torch.no_grad()
def _recomputed(model, steps, cache):
    """The decoding rule with no state carried between steps: each step prefills a fresh state."""
    answer, drawn, banned, after_backspace = [], [], None, False
    for _ in range(steps):
        logits = prefill(model, torch.tensor([PROMPT + answer]), model.init_state(1, **cache))
        if not answer or after_backspace:
            logits[:, BS] = float("-inf")
        if banned is not None:
            logits[:, banned] = float("-inf")
        token = int(logits.argmax())
        drawn.append(token)
        after_backspace = token == BS
        banned = answer.pop() if after_backspace else None
        if not after_backspace:
            answer.append(token)
    return drawn


CASES = {
    "dense": (["attention", "attention"], {}, {}),
    "dense, attention window": (["attention"], {"attn_window": 5}, {}),
    "sinks": (["attention", "attention"], {}, {"cache": "sinks", "sinks": 2, "window": 6}),
    "window": (["attention"], {}, {"cache": "window", "window": 5}),
    "mamba": (["mamba", "mamba"], {}, {}),
    "mamba2": (["mamba2"], {"ssm_head_dim": 16, "ssm_chunk": 8}, {}),
    "hybrid, sinks": (["mamba", "attention"], {}, {"cache": "sinks", "sinks": 1, "window": 6}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rollback_decoding_equals_recomputation(case):
    layers, overrides, cache = CASES[case]
    model = _model(layers, **overrides)
    state = model.init_state(1, **cache)
    result = generate_with_backspace(model, PROMPT, 30, temperature=0, state=state)
    assert result.drawn == _recomputed(model, 30, cache)
    assert result.backspaces >= 4 and result.tokens == apply_backspaces(result.drawn, BS)
    assert BS not in result.tokens
    # The state holds the prompt and the answer (but its last token, not fed, unless a
    # backspace came last): the same state as if the deleted tokens had never been fed.
    fed = result.tokens if result.drawn[-1] == BS else result.tokens[:-1]
    reference = model.init_state(1, **cache)
    with torch.no_grad():
        prefill(model, torch.tensor([PROMPT + fed]), reference)
    got, expected = state.state_dict(), reference.state_dict()
    assert sorted(got) == sorted(expected) and state.seq_len == len(PROMPT) + len(fed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_backspace_is_masked_where_it_cannot_delete():
    model = _model(["attention"])
    drawn = list(stream_with_backspace(model, [5], 30, temperature=0))  # the prompt ends in a "mistake"
    assert drawn[0] != BS  # nothing generated to delete yet
    for a, b in zip(drawn, drawn[1:]):
        assert not (a == BS and b == BS)  # never two in a row
    deleted = [drawn[i - 1] for i, t in enumerate(drawn) if t == BS and i]
    after = [drawn[i + 1] for i, t in enumerate(drawn[:-1]) if t == BS]
    assert deleted and all(d != a for d, a in zip(deleted, after))  # the deleted token is not drawn again at once


def test_sampling_is_seeded_and_stop_ends():
    model = _model(["mamba"])
    a = list(stream_with_backspace(model, PROMPT, 20, seed=3))
    assert a == list(stream_with_backspace(model, PROMPT, 20, seed=3))
    first = next(i for i, t in enumerate(a) if i and t != BS)
    assert list(stream_with_backspace(model, PROMPT, 20, seed=3, stop=[a[first]])) == a[: a.index(a[first]) + 1]


def test_refusals():
    model = _model(["attention"])
    with pytest.raises(ValueError, match="RecallCache cannot take back"):
        next(stream_with_backspace(model, PROMPT, 5, state=model.init_state(1, cache="recall", sinks=1, window=8,
                                                                             block=4, topk=1, repr_tokens=1)))
    with pytest.raises(ValueError, match="one sequence at a time"):
        next(stream_with_backspace(model, [PROMPT, PROMPT], 5))
    torch.manual_seed(0)
    plain = LanguageModel(ModelConfig(layers=["attention"], **SMALL))
    with pytest.raises(ConfigError, match="not trained with <backspace>"):
        next(stream_with_backspace(plain, PROMPT, 5))
    assert len(list(stream_with_backspace(plain, PROMPT, 5, backspace_id=BS))) == 5
    torch.manual_seed(0)
    short = LanguageModel(ModelConfig(layers=["attention"], max_seq_len=10, **SMALL))
    with pytest.raises(ValueError, match="limit of 10 positions"):
        next(stream_with_backspace(short, PROMPT, 7, backspace_id=BS))

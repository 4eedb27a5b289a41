"""Forking a session: two continuations from one state, neither disturbing the other."""

import pytest
import torch

from longctx.generation import generate
from longctx.model import LanguageModel, ModelConfig

SMALL = dict(vocab_size=40, d_model=32, n_heads=2, mlp_hidden=0, ssm_state=8, ssm_head_dim=16, ssm_chunk=8)
EMPTY = torch.empty(1, 0, dtype=torch.long)

CASES = {
    "attention": (["attention", "attention"], {}, {}),
    "ssm": (["mamba", "mamba2"], {}, {}),
    "hybrid-sinks": (["mamba", "attention"], {}, dict(cache="sinks", sinks=2, window=6)),
    "dilated": (["dilated"], dict(dilated_segments=[4, 8], dilated_rates=[1, 2], max_seq_len=8), {}),
}


def _snapshot(state):
    return {k: v.clone() for k, v in state.state_dict().items()}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", list(CASES))
def test_fork_gives_two_independent_continuations(name):
    layers, config, cache = CASES[name]
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=layers, **{**SMALL, **config})).eval()
    prompt, first, more = [1, 2, 3], 2, 3  # dilated: 8 positions in all
    if not config:
        first, more = 12, 10  # sink caches evict from token 9 on
    whole = generate(model, prompt, first + more, temperature=1.0, seed=5, state=model.init_state(1, **cache))

    state = model.init_state(1, **cache)
    generate(model, prompt, first, temperature=1.0, seed=5, state=state)
    at_fork = _snapshot(state)
    fork = state.fork()
    _assert_equal(_snapshot(fork), at_fork)

    original = generate(model, EMPTY, more, temperature=1.0, state=state)
    _assert_equal(_snapshot(fork), at_fork)  # the original's steps left the fork as it was
    after_original = _snapshot(state)
    forked = generate(model, EMPTY, more, temperature=1.0, state=fork)
    _assert_equal(_snapshot(state), after_original)  # and the fork's steps the original

    # Both continue the session as if it had never been forked (the sampler's RNG included).
    torch.testing.assert_close(original[0], whole[0, len(prompt) + first :], rtol=0, atol=0)
    torch.testing.assert_close(forked, original, rtol=0, atol=0)
    _assert_equal(_snapshot(fork), after_original)

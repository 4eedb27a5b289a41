"""Speculative decoding with prompt-lookup and self-speculative (layers:K) drafts: greedy
output equal to plain greedy decoding, sampled output from the same distribution, a state
left as plain decoding leaves it, and clear refusals."""

import collections
import itertools

import pytest
import torch

from longctx.generation import generate, stream
from longctx.generation.sampling import next_token_probs
from longctx.generation.speculative import DraftLength, LookupDraft, accept
from longctx.model import LanguageModel, ModelConfig

REPEATING = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]


def _model(vocab: int = 40, layers=("attention", "attention"), seed: int = 0, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(vocab_size=vocab, d_model=32, layers=list(layers), n_heads=2, **overrides)).eval()


def test_lookup_proposes_what_followed_the_latest_longest_match():
    lookup = LookupDraft(max_ngram=3)
    lookup.extend([5, 1, 2, 9, 1, 2, 3, 4, 8, 1, 2])
    assert lookup.propose(3) == [3, 4, 8]  # "1 2" last followed by 3 (not by 9): the latest occurrence
    lookup.extend([7])
    assert lookup.propose(3) == []  # "7" never seen before
    lookup.extend([1, 2, 3])
    assert lookup.propose(2) == [4, 8]  # "1 2 3" (3-gram) beats "3" alone


@pytest.mark.parametrize("draft_tokens", [None, 1, 3, 16])
@pytest.mark.parametrize("prompt", [REPEATING, [9, 8, 7, 6, 5]])
def test_greedy_output_equals_plain_greedy(prompt, draft_tokens):
    model = _model()
    plain = generate(model, prompt, 60, temperature=0)
    fast = generate(model, prompt, 60, temperature=0, draft="lookup", draft_tokens=draft_tokens)
    assert torch.equal(plain, fast)


@pytest.mark.parametrize("draft,draft_tokens", [("layers:1", None), ("layers:1", 1), ("layers:2", 4),
                                                ("layers:2", None)])
def test_layer_draft_greedy_output_and_state_equal_plain(draft, draft_tokens):
    """The first K blocks draft into the model's own caches: the output equals plain greedy
    decoding, and the state afterwards holds what plain decoding's holds (every layer the
    same positions, the rejected drafts gone)."""
    model = _model(layers=("attention",) * 3)
    spec_state, plain_state = model.init_state(1), model.init_state(1)
    a = list(stream(model, REPEATING, 40, temperature=0, state=spec_state, draft=draft, draft_tokens=draft_tokens))
    b = list(stream(model, REPEATING, 40, temperature=0, state=plain_state))
    assert a == b
    assert spec_state.seq_len == plain_state.seq_len
    for x, y in zip(spec_state.layers, plain_state.layers):
        assert x.seq_len == y.seq_len
        torch.testing.assert_close(x.state_dict(), y.state_dict())
    more_a = list(stream(model, [4, 5], 10, temperature=0, state=spec_state, draft=draft))
    assert more_a == list(stream(model, [4, 5], 10, temperature=0, state=plain_state))


def test_accept_with_a_draft_distribution_follows_the_rejection_rule():
    """A draft sampled from q, accepted with probability min(1, p/q), else replaced by a
    draw from norm(max(0, p - q)): the emitted token is distributed as p."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = next_token_probs(logits[0], temperature=1.0)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = collections.Counter()
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[accept(logits, [d], temperature=1.0, top_k=None, top_p=None, generator=g, q=q[None])[0]] += 1
    torch.testing.assert_close(torch.tensor([counts[i] / n for i in range(4)]), p, atol=0.015, rtol=0)


def test_drafts_are_accepted_and_the_state_is_plain_decodings():
    """On a repeating prompt most drafts pass (fewer model passes than tokens), and the
    session state afterwards equals the one plain decoding leaves: continuing either gives
    the same tokens, and the caches hold the same keys."""
    model = _model()
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    spec_state, plain_state = model.init_state(1), model.init_state(1)
    a = list(stream(model, REPEATING, 30, temperature=0, state=spec_state, draft="lookup"))
    hook.remove()
    b = list(stream(model, REPEATING, 30, temperature=0, state=plain_state))
    assert a == b
    assert len(calls) - 1 <= 20 and max(calls[1:]) > 1, calls  # after the prefill, passes of several tokens
    assert spec_state.seq_len == plain_state.seq_len
    for x, y in zip(spec_state.layers, plain_state.layers):
        torch.testing.assert_close(x.state_dict(), y.state_dict())
    more_a = list(stream(model, [4, 5], 10, temperature=0, state=spec_state, draft="lookup"))
    more_b = list(stream(model, [4, 5], 10, temperature=0, state=plain_state))
    assert more_a == more_b


def test_stopping_early_leaves_the_state_at_the_pending_token():
    model = _model()
    state = model.init_state(1)
    it = stream(model, REPEATING, 40, temperature=0, state=state, draft="lookup")
    got = [next(it) for _ in range(9)]
    it.close()  # mid-way through an accepted draft
    assert state.seq_len == len(REPEATING) + 8  # every token but the last (pending) is in the cache
    plain = generate(model, REPEATING, 12, temperature=0)[0, len(REPEATING):].tolist()
    rest = list(stream(model, [], 3, temperature=0, state=state))
    assert [int(t) for t in got + rest] == plain


def test_accept_follows_the_rejection_rule():
    """For point-mass drafts the emitted token of a position is distributed as p: the draft
    with probability p(d), else a draw from p without d."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = next_token_probs(logits[0], temperature=1.0)
    g = torch.Generator().manual_seed(0)
    n = 20000
    first = collections.Counter(accept(logits, [1], temperature=1.0, top_k=None, top_p=None, generator=g)[0]
                                for _ in range(n))
    freq = torch.tensor([first[i] / n for i in range(4)])
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)


@pytest.mark.parametrize("draft", ["lookup", "layers:1"])  # point-mass drafts; drafts sampled from q
def test_sampled_sequences_have_plain_samplings_distribution(draft):
    """Three tokens sampled after a repeating prompt (the second one drafted and checked),
    with temperature and top-p: the frequency of each token at each position is within
    sampling noise of the exact distribution (by enumeration)."""
    vocab, n = 4, 1000
    model = _model(vocab=vocab, seed=3)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    kwargs = dict(temperature=1.3, top_p=0.95)

    def frequencies(**extra) -> torch.Tensor:  # (position, token)
        out = torch.zeros(3, vocab)
        for seed in range(n):
            seq = generate(model, prompt, 3, seed=seed, **kwargs, **extra)[0, -3:]
            out[torch.arange(3), seq] += 1 / n
        return out

    exact = torch.zeros(3, vocab)
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=3):
            probs = next_token_probs(model(torch.tensor([prompt + list(seq[:2])]))[0, len(prompt) - 1 :], **kwargs)
            exact[torch.arange(3), torch.tensor(seq)] += probs[0, seq[0]] * probs[1, seq[1]] * probs[2, seq[2]]
    spec = frequencies(draft=draft, draft_tokens=2)
    noise = 4 * (exact * (1 - exact) / n).sqrt() + 1e-3  # four standard errors
    assert ((spec - exact).abs() <= noise).all(), (spec, exact)


def test_adaptive_length_grows_on_success_and_shrinks_on_rejection():
    length = DraftLength(None)
    start = length.k
    length.update(start, start)
    assert length.k == start + 2
    length.update(length.k, 1)
    assert length.k == 2
    fixed = DraftLength(5)
    fixed.update(5, 0)
    assert fixed.k == 5 and fixed.take() == 5


def test_adaptive_length_waits_longer_after_each_failed_draft():
    length = DraftLength(None)
    length.update(4, 0)  # nothing accepted: one plain pass, then a draft
    assert [length.take() for _ in range(2)] == [0, 1]
    length.update(1, 0)  # failed again: two plain passes
    assert [length.take() for _ in range(3)] == [0, 0, 1]
    length.update(1, 1)  # accepted: no wait
    assert length.take() == 3


@pytest.mark.parametrize("case,match", [
    ("batch", "one sequence at a time"),
    ("sinks", "SinkKVCache"),
    ("mamba", "SSMState"),
    ("name", "draft must be one of lookup"),
    ("length", "draft_tokens must be >= 1"),
    ("window", "under an attention window"),  # the layers forget keys a rewind would need
    ("layers-0", "K must be 1 .. 1; got 0"),
    ("layers-2", "K must be 1 .. 1; got 2"),  # all the blocks: no cheaper than the model
    ("layers-x", "draft must be one of lookup, layers:K"),
    ("layers-batch", "one sequence at a time"),
    ("layers-sinks", "SinkKVCache"),
])
def test_refusals(case, match):
    model = _model(layers=("attention", "mamba") if case == "mamba" else ("attention", "attention"),
                   **({"attn_window": 4} if case == "window" else {}))
    prompt = [[1, 2, 3], [1, 2, 3]] if case.endswith("batch") else [1, 2, 3]
    state = model.init_state(2 if case.endswith("batch") else 1, **({"cache": "sinks"} if case.endswith("sinks") else {}))
    draft = {"name": "ngram", "layers-0": "layers:0", "layers-2": "layers:2", "layers-x": "layers:x",
             "layers-batch": "layers:1", "layers-sinks": "layers:1"}.get(case, "lookup")
    with pytest.raises(ValueError, match=match):
        list(stream(model, prompt, 5, state=state, draft=draft, draft_tokens=0 if case == "length" else None))

import itertools

import pytest
import torch

from longctx.data import ByteTokenizer
from longctx.generation import generate, sample_next, stream, stream_text
from longctx.model import LanguageModel, ModelConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=40, d_model=32, layers=["attention"] * 2, n_heads=2)).eval()


def test_greedy_is_deterministic_and_matches_argmax_of_full_forward(model):
    prompt = torch.tensor([[1, 2, 3, 4]])
    out = generate(model, prompt, 12, temperature=0)
    assert torch.equal(out, generate(model, prompt, 12, temperature=0))
    with torch.no_grad():
        logits = model(out[:, :-1])
    torch.testing.assert_close(logits[:, 3:].argmax(-1), out[:, 4:], rtol=0, atol=0)


def test_seeded_sampling_repeats(model):
    a = generate(model, [5, 6], 20, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    b = generate(model, [5, 6], 20, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    assert torch.equal(a, b) and a.shape == (1, 22)


def test_stream_yields_as_it_goes_and_stops(model):
    first = next(stream(model, [1, 2], 100, temperature=0))
    tokens = list(stream(model, [1, 2], 100, temperature=0, stop=[int(first)]))
    assert len(tokens) == 1


class _Bytes40(ByteTokenizer):
    """Byte tokens for the 40-token model: its ids are bytes 0-39, and id 1 is eos."""

    eos_id = 1


def test_no_token_limit_ends_at_the_first_eos(model):
    """`longctx generate --max-new-tokens -1` asks stream_text for no limit (None): the text
    is the sampled tokens up to the first eos (at most 100 pieces are read, so a miss fails)."""
    tokenizer = _Bytes40()
    sampled = generate(model, tokenizer.encode("!"), 30, temperature=1.0, seed=0)[0, 1:].tolist()
    first_eos = sampled.index(tokenizer.eos_id)
    pieces = stream_text(model, tokenizer, "!", None, temperature=1.0, seed=0)
    text = "".join(itertools.islice(pieces, 100))
    assert first_eos > 0 and text == tokenizer.decode(sampled[:first_eos])


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample_next(logits, top_p=0.5, generator=g)) for _ in range(200)}
    assert picks == {0}


def test_bad_sampling_arguments(model):
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 2, top_p=0)


def test_prompt_too_long_for_absolute_positions():
    m = LanguageModel(ModelConfig(vocab_size=40, d_model=16, layers=["attention"], n_heads=2, pos="learned", max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds this model's limit of 8"):
        generate(m, list(range(6)), 5)
    # Without a token limit, generation stops at the position limit instead.
    assert generate(m, list(range(6)), None, temperature=0).shape == (1, 8)


def test_continuing_a_session_equals_one_long_generation(model):
    once = generate(model, [3, 1, 4], 12, temperature=0)
    state = model.init_state(1)
    first = generate(model, [3, 1, 4], 5, temperature=0, state=state)
    assert state.seq_len == 7  # the 5th new token waits, unfed, in state.extra["pending"]
    second = generate(model, torch.empty(1, 0, dtype=torch.long), 7, temperature=0, state=state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), once, rtol=0, atol=0)
    # The caches are ordinary tensors: the model can keep reading them outside generation.
    with torch.no_grad():
        model(torch.tensor([[1]]), state)


def test_top_p_keeps_ties_together():
    g = torch.Generator().manual_seed(0)
    for order in ([0.4, 0.3, 0.3], [0.3, 0.3, 0.4]):
        logits = torch.tensor([order]).log()
        picks = {int(sample_next(logits, top_p=0.5, generator=g)) for _ in range(300)}
        assert picks == {0, 1, 2}
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert {int(sample_next(logits, top_p=0.75, generator=g)) for _ in range(300)} == {0, 1}

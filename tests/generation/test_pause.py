"""Decoding after pauses: the answer starts with the output at the last pause, outputs at
the pauses are not read, and pauses never appear in the answer."""

import pytest
import torch

from longctx.generation import generate
from longctx.generation.pause import append_pauses, generate_after_pauses
from longctx.model import LanguageModel, ModelConfig
from longctx.model.config import ConfigError

V, P = 40, 37
SMALL = dict(vocab_size=V, d_model=32, n_heads=4, mlp_hidden=0, layers=["attention", "mamba"], tie_embeddings=False)
PROMPTS = [[3, 14, 15, 9], [2, 7, 1, 8]]


def _model(cls=LanguageModel, **overrides):
    torch.manual_seed(0)
    return cls(ModelConfig(**{**SMALL, "special_tokens": {"pause": P}, **overrides})).eval()


def test_append_pauses():
    assert append_pauses([1, 2], 3, P).tolist() == [[1, 2, P, P, P]]
    assert append_pauses(torch.tensor(PROMPTS), 0, P).tolist() == PROMPTS
    with pytest.raises(ValueError, match="number of pauses"):
        append_pauses([1], -2, P)


@torch.no_grad()
def test_answer_starts_at_the_last_pause_and_ignores_pause_outputs():
    model = _model()
    answers = generate_after_pauses(model, PROMPTS, 4, 6, temperature=0)
    prompt = append_pauses(torch.tensor(PROMPTS), 4, P)
    logits = model(prompt)
    assert P not in logits[:, -1].argmax(-1)  # (so the answers' first tokens are these)
    assert [a[0] for a in answers] == logits[:, -1].argmax(-1).tolist()
    # The same as plain greedy decoding of the prompt with its pauses, pauses left out.
    full = generate(model, prompt, 6, temperature=0)[:, prompt.shape[1] :].tolist()
    assert answers == [[t for t in row if t != P] for row in full]


class PausesOnEvenSteps(LanguageModel):
    """Generates a pause whenever it has seen an even number of tokens."""

    def forward(self, ids, state=None, *, last_only=False):
        logits = super().forward(ids, state, last_only=last_only)
        if state is not None and state.seq_len % 2 == 0:
            logits[..., P] += 1000.0
        return logits


@torch.no_grad()
def test_generated_pauses_are_not_in_the_answer():
    model = _model(PausesOnEvenSteps)
    raw = generate(model, append_pauses(PROMPTS[0], 2, P), 10, temperature=0)[0, 6:].tolist()
    assert raw.count(P) == 5
    answer = generate_after_pauses(model, PROMPTS[0], 2, 10, temperature=0)
    assert answer == [[t for t in raw if t != P]] and len(answer[0]) == 5


def test_pause_id_comes_from_the_model():
    plain = _model(special_tokens={})
    with pytest.raises(ConfigError, match="not trained with <pause> tokens"):
        generate_after_pauses(plain, PROMPTS[0], 2, 3)
    # The paper's control: pauses at inference only, on a model not trained with them.
    assert len(generate_after_pauses(plain, PROMPTS[0], 2, 3, pause_id=P, temperature=0)[0]) <= 3
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate_after_pauses(plain, PROMPTS[0], 2, 3, pause_id=V)

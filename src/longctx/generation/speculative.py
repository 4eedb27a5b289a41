"""Speculative decoding: a cheap draft proposes the next tokens, the model checks them all
in one forward pass, and a rejection rule keeps exactly the model's output distribution
(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen
et al. 2023).

The draft here is prompt lookup (``LookupDraft``): the tokens that followed the latest
earlier occurrence of the sequence's last n-gram.  It costs no model, and wins where the
output copies from the input (edits, summaries, answers quoting a document).

The rule (``accept``), with the model's distributions ``p_i`` after temperature, top-k and
top-p, and a draft that proposes one token ``d`` with certainty (q is a point mass):
accept ``d`` with probability ``min(1, p(d) / q(d)) = p(d)``; on rejection sample from
``norm(max(0, p - q))``, which is ``p`` without ``d``; when every draft passes, sample one
more token from the last distribution.  Greedy decoding accepts ``d`` iff it is the argmax,
so the output equals plain greedy decoding.
"""

from __future__ import annotations

import torch

from longctx.generation.sampling import next_token_probs

# Draft length: fixed with ``draft_tokens``, else adaptive from this start within these bounds.
ADAPTIVE_START, ADAPTIVE_MIN, ADAPTIVE_MAX = 4, 1, 16
DRAFTS = ("lookup",)


class LookupDraft:
    """Prompt lookup over every token seen (prompt and output).

    For n from ``max_ngram`` down to 1, the last n tokens are looked up among the n-grams
    seen before; the first hit proposes the tokens that followed its latest occurrence.
    An index maps each n-gram to the end of its latest occurrence that has a successor, so
    a proposal costs ``max_ngram`` lookups whatever the length."""

    def __init__(self, max_ngram: int = 3) -> None:
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1; got {max_ngram}")
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}

    def extend(self, tokens) -> None:
        for token in tokens:
            end = len(self.tokens) - 1  # the n-grams ending here now have a successor
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self._ends[tuple(self.tokens[end - n + 1 : end + 1])] = end
            self.tokens.append(int(token))

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens to follow the sequence (none without a match)."""
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            end = self._ends.get(tuple(self.tokens[-n:]))
            if end is not None:
                return self.tokens[end + 1 : end + 1 + k]
        return []


def accept(logits: torch.Tensor, drafts: list[int], *, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator) -> list[int]:
    """The tokens to emit after checking ``drafts`` (``k`` point-mass proposals) against the
    model's ``logits (k + 1, vocab)`` at ``[last token, *drafts]``: the accepted drafts,
    then the correction of the first rejected one or, if none is, one more token."""
    if temperature == 0:
        target = logits.argmax(dim=-1).tolist()
        n = next((i for i, d in enumerate(drafts) if d != target[i]), len(drafts))
        return [*drafts[:n], target[n]]
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    for i, d in enumerate(drafts):
        if float(torch.rand((), generator=generator)) < float(probs[i, d]):
            continue
        residual = probs[i].clone()
        residual[d] = 0  # max(0, p - q) for q a point mass at d
        return [*drafts[:i], int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    return [*drafts, int(torch.multinomial(probs[len(drafts)], 1, generator=generator))]


class DraftLength:
    """How many tokens to draft next: ``fixed``, or adaptive: two more after a fully
    accepted draft, one more than were accepted otherwise, within ``ADAPTIVE_MIN ..
    ADAPTIVE_MAX``."""

    def __init__(self, fixed: int | None) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"draft_tokens must be >= 1; got {fixed}")
        self.fixed, self.k = fixed, fixed or ADAPTIVE_START

    def update(self, drafted: int, accepted: int) -> None:
        if self.fixed is None and drafted:
            grown = self.k + 2 if accepted == drafted else accepted + 1
            self.k = max(ADAPTIVE_MIN, min(ADAPTIVE_MAX, grown))

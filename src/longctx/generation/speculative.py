"""Speculative decoding: a cheap draft proposes the next tokens, the model checks them all
in one forward pass, and a rejection rule keeps exactly the model's output distribution
(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen
et al. 2023).

Two drafts (``make_draft``):

- ``"lookup"`` (``LookupDraft``): prompt lookup, the tokens that followed the latest earlier
  occurrence of the sequence's last n-gram.  It costs no model, and wins where the output
  copies from the input (edits, summaries, answers quoting a document).
- ``"layers:K"`` (``LayerDraft``): self-speculation (LayerSkip, Draft & Verify): the first
  K blocks of the model itself, then its final norm and LM head.  No second model and no
  second cache: the draft's tokens go through the first K layers' own caches, and the
  check runs only the remaining layers on the hidden states the draft computed.

The rule (``accept``), with the model's distributions ``p_i`` after temperature, top-k and
top-p, and the draft's ``q_i`` after the same: accept draft ``d`` with probability
``min(1, p(d) / q(d))``; on rejection sample from ``norm(max(0, p - q))``; when every draft
passes, sample one more token from the last distribution.  Lookup proposes with certainty
(q a point mass at ``d``: accept with probability ``p(d)``, on rejection sample from ``p``
without ``d``).  Greedy decoding drafts the argmax and accepts ``d`` iff it is the model's
argmax, so the output equals plain greedy decoding.
"""

from __future__ import annotations

import torch

from longctx.generation.sampling import next_token_probs

# Draft length: fixed with ``draft_tokens``, else adaptive from this start within these bounds.
ADAPTIVE_START, ADAPTIVE_MIN, ADAPTIVE_MAX = 4, 1, 16
# The drafts named by a word (the server's); ``make_draft`` also takes ``layers:K``.
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
        """Record ``tokens`` as the sequence's next ones (prompt, then accepted output)."""
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

    def draft(self, model, state, pending: int, k: int, *, sampling: dict,
              generator: torch.Generator) -> tuple[list[int], None]:
        """``propose(k)`` as certain drafts (no distribution: ``accept`` takes point masses)."""
        return self.propose(k), None

    def verify(self, model, state, pending: int, drafts: list[int]) -> torch.Tensor:
        """The model's logits ``(k + 1, vocab)`` at ``[pending, *drafts]``, fed into ``state``."""
        return model(torch.tensor([[pending, *drafts]], device=_device(model)), state)[0]


def _device(model) -> torch.device:
    return next(model.parameters()).device


class LayerDraft:
    """Self-speculative draft: the model's first ``layers`` blocks, its final norm and LM
    head (LayerSkip, Elhoushi et al. 2024; Draft & Verify, Zhang et al. 2023), untrained.

    The first K blocks compute for each token exactly what they compute inside the whole
    model (a block sees only the blocks below it), so the draft shares their caches: each
    drafted token is fed through the first K layers of the model's own state and its hidden
    state after block K is kept; ``verify`` feeds the last draft through those K layers and
    runs blocks K.. once over ``[pending, *drafts]`` from the kept hidden states.  Every
    layer then holds the same positions, and rewinding the rejected drafts rewinds the
    draft's cache with the model's.  Between ``draft`` and ``verify`` the first K layers
    are ahead of the rest (and of ``state.seq_len``): the two are called back to back."""

    def __init__(self, model, layers: int) -> None:
        total = len(model.blocks)
        if not 1 <= layers < total:
            raise ValueError(f"layers:K drafts with the first K of the model's {total} blocks: K must be 1 .. "
                             f"{total - 1}; got {layers}")
        if model.memory is not None:
            raise ValueError("layers:K cannot draft for a model with memory tokens (segments rewrite the memory)")
        self.model, self.layers = model, layers
        self._hidden: list[torch.Tensor] = []  # (1, 1, d_model) after block K, one per drafted-from token

    def extend(self, tokens) -> None:
        """Nothing to record: the draft reads the sequence from the model's state."""

    def _shallow(self, token: int, state, offset: int) -> torch.Tensor:
        """``token`` at position ``state.seq_len + offset`` through the first K blocks (into
        their caches): the hidden state ``(1, 1, d_model)`` there."""
        model = self.model
        ids = torch.tensor([[token]], device=_device(model))
        x = model.embed(ids)
        if model.pos_embed is not None:
            x = x + model.pos_embed(model.positions(state.seq_len + offset, 1, ids.device))
        for block, layer in zip(model.blocks[: self.layers], state.layers):
            x = block(x, layer)
        return x

    def draft(self, model, state, pending: int, k: int, *, sampling: dict,
              generator: torch.Generator) -> tuple[list[int], torch.Tensor | None]:
        """``k`` tokens after ``pending``, each from the shallow model's distribution (its argmax
        when greedy), and those distributions ``q (k, vocab)`` (None when greedy)."""
        self._hidden, drafts, dists = [], [], []
        token = pending
        for i in range(k):
            h = self._shallow(token, state, i)
            self._hidden.append(h)
            logits = model.lm_head(model.norm(h))[0, -1]
            if sampling["temperature"] == 0:
                token = int(logits.argmax())
            else:
                q = next_token_probs(logits, **sampling)
                token = int(torch.multinomial(q, 1, generator=generator))
                dists.append(q)
            drafts.append(token)
        return drafts, torch.stack(dists) if dists else None

    def verify(self, model, state, pending: int, drafts: list[int]) -> torch.Tensor:
        """The model's logits ``(k + 1, vocab)`` at ``[pending, *drafts]`` (``draft``'s tokens,
        just drafted); afterwards every layer of ``state`` holds those k + 1 positions."""
        k = len(drafts)
        x = torch.cat([*self._hidden, self._shallow(drafts[-1], state, k)], dim=1)
        self._hidden = []
        for block, layer in zip(model.blocks[self.layers :], state.layers[self.layers :]):
            x = block(x, layer)
        state.seq_len += k + 1
        return model.lm_head(model.norm(x))[0]


def make_draft(model, draft: str) -> LookupDraft | LayerDraft:
    """The draft named ``draft``: ``"lookup"`` or ``"layers:K"``."""
    if draft == "lookup":
        return LookupDraft()
    name, _, k = draft.partition(":")
    if name == "layers" and k.strip().lstrip("-").isdigit():
        return LayerDraft(model, int(k))
    raise ValueError(f"draft must be one of {', '.join(DRAFTS)}, layers:K (the first K blocks); got {draft!r}")


def accept(logits: torch.Tensor, drafts: list[int], *, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator, q: torch.Tensor | None = None) -> list[int]:
    """The tokens to emit after checking ``drafts`` against the model's ``logits (k + 1,
    vocab)`` at ``[last token, *drafts]``: the accepted drafts, then the correction of the
    first rejected one or, if none is, one more token.  ``q (k, vocab)``: the distributions
    the drafts were sampled from; None for point masses (certain drafts).  Greedy decoding
    ignores ``q``: its drafts are the draft's argmax."""
    if temperature == 0:
        target = logits.argmax(dim=-1).tolist()
        n = next((i for i, d in enumerate(drafts) if d != target[i]), len(drafts))
        return [*drafts[:n], target[n]]
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    for i, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[i, d])
        # u < min(1, p/q), without dividing by a q(d) that rounding may have made tiny
        if float(torch.rand((), generator=generator)) * q_d < float(probs[i, d]):
            continue
        if q is None:
            residual = probs[i].clone()
            residual[d] = 0  # max(0, p - q) for q a point mass at d
        else:
            residual = (probs[i] - q[i]).clamp(min=0)
        if not residual.sum() > 0:
            # p <= q everywhere means p == q up to rounding: then the rejection happened
            # with probability ~0, and p is the exact residual's limit
            residual = probs[i]
        return [*drafts[:i], int(torch.multinomial(residual / residual.sum(), 1, generator=generator))]
    return [*drafts, int(torch.multinomial(probs[len(drafts)], 1, generator=generator))]


class DraftLength:
    """How many tokens to draft next (``take()``): ``fixed``, or adaptive: two more after a
    fully accepted draft, one more than were accepted otherwise, within ``ADAPTIVE_MIN ..
    ADAPTIVE_MAX``; and after a draft of which nothing was accepted, none for the next
    ``wait`` passes, a wait that doubles (up to ``ADAPTIVE_MAX``) while drafts keep failing
    and ends with the first accepted token.  Why: a pass that checks drafts costs more than
    a plain one-token step (a multi-token forward instead of ``fast_decode``'s kernels), so
    where nothing matches (free chat) drafting would only slow decoding down."""

    def __init__(self, fixed: int | None) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"draft_tokens must be >= 1; got {fixed}")
        self.fixed, self.k = fixed, fixed or ADAPTIVE_START
        self.wait, self._skip = 0, 0  # passes left without drafts; the next failure's wait

    def take(self) -> int:
        """The draft length of this pass (0: a plain step)."""
        if self.wait:
            self.wait -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if self.fixed is None and drafted:
            grown = self.k + 2 if accepted == drafted else accepted + 1
            self.k = max(ADAPTIVE_MIN, min(ADAPTIVE_MAX, grown))
            self._skip = min(ADAPTIVE_MAX, 2 * self._skip or 1) if accepted == 0 else 0
            self.wait = self._skip

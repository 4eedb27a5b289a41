"""Autoregressive generation on the model's state (KV caches, recurrent states)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch

from longctx.cache.model_state import ModelState
from longctx.cache.sink import SinkKVCache
from longctx.generation.fast_decode import fast_decoder
from longctx.generation.sampling import check_sampling, sample_next
from longctx.generation.speculative import DraftLength, LayerDraft, LookupDraft, accept, make_draft


def _as_batch(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"prompt ids must be a (time,) or (batch, time) sequence; got shape {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def prefill(model, ids: torch.Tensor, state: ModelState, chunk: int | None = None) -> torch.Tensor:
    """Feed ``ids (batch, time)`` into ``state``; returns the logits of the last position
    ``(batch, vocab)``.  In pieces of at most ``chunk`` tokens (None: one piece), and where
    the state has a bounded cache (sinks, window), of at most the tokens it takes before it
    evicts: once it is full, one token at a time, exactly as a stream would feed them."""
    if ids.shape[1] == 0:
        raise ValueError("nothing to prefill: ids has no tokens")
    fed = 0
    while True:
        rooms = [s.capacity - s.seq_len for s in state.layers if isinstance(s, SinkKVCache)]
        n = ids.shape[1] - fed if chunk is None else min(chunk, ids.shape[1] - fed)
        if rooms:
            n = max(1, min(n, *rooms))
        logits = model(ids[:, fed : fed + n], state, last_only=True)[:, -1]
        fed += n
        if fed == ids.shape[1]:
            return logits


class Generation:
    """One call's generation on a state, one token at a time: the bookkeeping that ``stream``
    drives with the model's one-token steps and the server with batched steps over several
    generations (``longctx.generation.batched``).

    Construction checks the arguments (``stream``'s) and prefills ``ids`` after the
    session's pending token; ``logits`` are then the last position's, ``(batch, vocab)``.
    ``next_token()`` samples from ``logits`` and records the token in ``state.extra`` as
    ``stream`` does (``pending``, the sampler's ``rng``, the stopped sequences' ``done``).
    Unless ``finished``, the driver then feeds ``take_pending()`` ``(batch, 1)`` through the
    model and sets ``logits`` to what that step returns.  ``speculative``: refuse what
    speculative decoding cannot continue (a batch, a state that cannot forget tokens).
    """

    def __init__(self, model, ids, max_new_tokens: int | None, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Iterable[int] = (),
                 state: ModelState | None = None, speculative: bool = False) -> None:
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens is not None and max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, or None for no limit; got {max_new_tokens}")
        ids = _as_batch(ids).to(next(model.parameters()).device)
        if state is None:
            state = model.init_state(ids.shape[0])
        if ids.shape[1]:  # new input (a chat turn) resumes sequences that had stopped
            state.extra.pop("done", None)
        pending = state.extra.pop("pending", None)
        if pending is not None:
            if ids.shape[0] not in (1, pending.shape[0]):
                raise ValueError(f"the session has batch size {pending.shape[0]}; the new ids have {ids.shape[0]}")
            ids = torch.cat([pending.to(ids.device), ids.expand(pending.shape[0], -1)], dim=1)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's bos_id)")
        if speculative:
            _check_speculative(model, state, ids)
        limit = model.position_limit(state)
        seen = state.seq_len
        if max_new_tokens is None:
            max_new_tokens = sys.maxsize if limit is None else max(limit - seen - ids.shape[1], 0)
        elif limit is not None and seen + ids.shape[1] + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds this model's "
                f"limit of {limit} positions (model.max_seq_len); shorten the prompt or generate fewer tokens"
            )
        # The sampler's RNG lives in the state, so a saved and restored session samples the
        # same continuation as one that never stopped; an explicit seed starts afresh.
        generator = torch.Generator(device=ids.device)
        if seed is not None:
            generator.manual_seed(seed)
        elif "rng" in state.extra:
            generator.set_state(state.extra["rng"])
        else:
            generator.manual_seed(int(torch.randint(2**62, ())))
        self.state, self.ids, self.max_new_tokens, self.generator = state, ids, max_new_tokens, generator
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.stop_ids = torch.tensor(sorted(set(stop)), dtype=torch.long, device=ids.device)
        self.logits = prefill(model, ids, state)
        # Sequences that stopped earlier in the session stay stopped until new input comes.
        self.done = state.extra.get("done", torch.zeros(ids.shape[0], dtype=torch.bool)).to(ids.device)
        # Per-token bookkeeping only where it can change anything (it is a tenth of a small
        # model's step): stop checks when there are stop ids or stopped sequences, the RNG
        # snapshot when sampling draws from it.
        self.check_stop = len(self.stop_ids) > 0 or bool(self.done.any())
        self.emitted = 0
        state.extra["done"] = self.done.clone()
        state.extra["rng"] = generator.get_state()

    @property
    def finished(self) -> bool:
        """``max_new_tokens`` emitted, or every sequence stopped."""
        return self.emitted >= self.max_new_tokens or (self.check_stop and bool(self.done.all()))

    def next_token(self) -> torch.Tensor:
        """The next token of each sequence ``(batch,)``, from ``logits``; it becomes pending."""
        token = sample_next(self.logits, **self.sampling, generator=self.generator)
        extra = self.state.extra
        if self.check_stop:
            token = torch.where(self.done, self.ids[:, -1], token)
            self.done |= torch.isin(token, self.stop_ids)
            extra["done"] = self.done.clone()
        if self.sampling["temperature"] > 0:
            extra["rng"] = self.generator.get_state()
        self.ids = token[:, None]
        extra["pending"] = self.ids
        self.emitted += 1
        return token

    def take_pending(self) -> torch.Tensor:
        """The pending tokens ``(batch, 1)``, which the caller now feeds."""
        return self.state.extra.pop("pending")


@torch.no_grad()  # not inference_mode: the caches must stay usable outside it
def stream(
    model,
    ids,
    max_new_tokens: int | None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Iterable[int] = (),
    state: ModelState | None = None,
    draft: str | None = None,
    draft_tokens: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the new tokens one step at a time, each ``(batch,)``.

    The prompt ``ids`` ``(time,)`` or ``(batch, time)`` is prefilled in one pass (``prefill``:
    bounded caches take it in pieces), then each step feeds one token through the cache.  ``max_new_tokens=None`` generates until every
    sequence stopped, or up to the model's position limit when it has one.  A sequence that produced a ``stop`` token
    keeps producing it; iteration ends when every sequence has stopped.  Continuing a session
    with new ``ids`` resumes the sequences that had stopped (the next turn of a chat).

    Pass ``state`` to continue a session: ``ids`` are then the new tokens only.  The last
    token yielded has not been through the model yet (no step is spent on a token nobody
    may want); it waits in ``state.extra["pending"]`` and is fed first on the next call.
    Without a ``seed``, sampling continues the RNG kept in ``state.extra["rng"]`` (seeded
    from torch's global RNG the first time).

    ``draft="lookup"`` or ``"layers:K"`` decodes speculatively
    (``longctx.generation.speculative``): the same output as without it for greedy
    decoding, the same distribution when sampling, for batch 1 and states that can forget
    tokens (dense KV caches); ``draft_tokens`` fixes the draft length (default: adaptive).
    The lookup sees this call's ``ids`` and output; ``layers:K`` drafts with the model's
    first K blocks.
    """
    drafter = None if draft is None else make_draft(model, draft)
    length = None if draft is None else DraftLength(draft_tokens)
    gen = Generation(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     stop=stop, state=state, speculative=draft is not None)
    # one-token steps in two kernel calls per layer where the model allows (fast_decode)
    fast_step = fast_decoder(model, gen.state) if gen.ids.device.type == "cpu" else None
    if drafter is not None:
        yield from _speculate(model, gen, drafter, length, fast_step)
        return
    while not gen.finished:
        yield gen.next_token()
        if gen.finished:
            return
        ids = gen.take_pending()
        gen.logits = model(ids, gen.state, last_only=True)[:, -1] if fast_step is None else fast_step(ids)


def _check_speculative(model, state: ModelState, ids: torch.Tensor) -> None:
    if ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time; got a batch of {ids.shape[0]}")
    if getattr(model.config, "attn_window", None) is not None:
        # after a pass over the drafts the layers have already forgotten the keys that left
        # the window, which rewinding the rejected drafts would need back
        raise ValueError(f"speculative decoding cannot take back rejected drafts under an attention window "
                         f"(attn_window={model.config.attn_window}); decode without a draft")
    state.rewind(0)  # rejected drafts leave the state this way: refused here by states that cannot


def _speculate(model, gen: Generation, drafter: LookupDraft | LayerDraft, length: DraftLength,
               fast_step) -> Iterator[torch.Tensor]:
    """``stream``'s loop with drafts: each pass feeds the pending token and the drafts,
    yields the tokens ``accept`` keeps, and leaves the state holding every token before the
    pending one (also when the caller stops early: ``surplus`` is rewound on exit)."""
    state, ids, sampling, generator, stop_ids = gen.state, gen.ids, gen.sampling, gen.generator, gen.stop_ids
    max_new_tokens = gen.max_new_tokens
    if max_new_tokens == 0:
        return
    drafter.extend(ids[0].tolist())
    limit = model.position_limit(state)
    queue = [int(sample_next(gen.logits, **sampling, generator=generator))]
    emitted, surplus = 0, 0
    try:
        while True:
            for i, token in enumerate(queue):
                surplus = len(queue) - 1 - i  # fed tokens after the one now pending
                if sampling["temperature"] > 0:
                    state.extra["rng"] = generator.get_state()
                done = bool(torch.isin(torch.tensor(token), stop_ids))
                if done:
                    state.extra["done"] = torch.ones(1, dtype=torch.bool)
                pending = torch.tensor([[token]], device=ids.device)
                state.extra["pending"] = pending
                yield pending[0]
                emitted += 1
                if emitted == max_new_tokens or done:
                    return
            drafter.extend(queue)
            room = max_new_tokens - emitted - 1  # drafts + 1 tokens may come out of a pass
            if limit is not None:
                room = min(room, limit - state.seq_len - 1)
            del state.extra["pending"]
            k = min(length.take(), max(room, 0))
            drafts, q = drafter.draft(model, state, token, k, sampling=sampling, generator=generator) if k else ([], None)
            if not drafts:
                step = model(pending, state, last_only=True)[:, -1] if fast_step is None else fast_step(pending)
                queue = [int(sample_next(step, **sampling, generator=generator))]
                continue
            logits = drafter.verify(model, state, token, drafts)
            queue = accept(logits, drafts, **sampling, generator=generator, q=q)
            state.rewind(len(drafts) + 1 - len(queue))  # the rejected drafts
            length.update(len(drafts), len(queue) - 1)
    finally:
        if surplus:
            state.rewind(surplus)


def generate(model, ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Prompt plus new tokens, ``(batch, time + new)``; same arguments as ``stream``."""
    prompt = _as_batch(ids)
    new = list(stream(model, prompt, max_new_tokens, **kwargs))
    if not new:
        return prompt
    return torch.cat([prompt, torch.stack(new, dim=1).to(prompt.device)], dim=1)

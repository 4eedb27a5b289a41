"""A model state with the token ids it stands for, and the reuse of such states by later
prompts: the in-RAM prefix cache and, on disk, the sessions (``sessions.py``).

The rule, the same for sessions and the prefix cache: a request's prompt is the whole text
(a chat's messages rendered by its template, a completion's prompt).  The longest common
prefix of the prompt and a context's ``tokens`` is kept; the rest of the prompt is fed.
States that can forget tokens (dense KV caches) are rewound to that prefix; the others
(sink, window and recall caches, state-space layers) can only be continued, so with them
the prompt must extend everything the state has seen.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from longctx.cache.model_state import ModelState


@dataclass
class Context:
    """``state`` after the model saw ``tokens``; when ``state.extra`` holds a ``pending``
    token (the last one generation yielded, not fed yet) it is ``tokens[-1]``."""

    state: ModelState
    tokens: list[int]

    @property
    def fed(self) -> int:
        """How many of ``tokens`` went through the model."""
        return len(self.tokens) - ("pending" in self.state.extra)

    def fork(self) -> Context:
        return Context(self.state.fork(), list(self.tokens))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def can_rewind(state: ModelState) -> bool:
    """Whether ``state`` can forget tokens: every layer's cache can, and no memory-token memory
    (written at segment ends) would have to be taken back."""
    return state.memory is None and all(hasattr(s, "rewind") for s in state.layers)


class Mismatch(ValueError):
    """The prompt does not extend the context and its state cannot be rewound to fit."""


def resume(ctx: Context, prompt: list[int]) -> list[int]:
    """Make ``ctx`` hold the longest usable prefix of ``prompt`` and return the ids still to
    feed (possibly none, when the pending token completes the prompt: ``stream`` feeds it
    first).  ``ctx.tokens`` becomes ``prompt``.  Raises ``Mismatch`` when the state would
    have to forget tokens and cannot (or, for a dense cache, holds fewer than that)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    extra = ctx.state.extra
    extra.pop("done", None)  # new input: sequences that stopped go on (stream does this too)
    same = common_prefix(ctx.tokens, prompt)
    if same == len(ctx.tokens) and (same < len(prompt) or "pending" in extra):
        ctx.tokens = list(prompt)
        return prompt[same:]
    # Keep at most the fed tokens that agree with the prompt, and leave at least one prompt
    # token to feed: its logits give the first new token.
    keep = min(same, ctx.fed, len(prompt) - 1)
    if keep < ctx.fed:
        if not can_rewind(ctx.state):
            raise Mismatch(f"the prompt does not extend the session's history (their first {same} tokens agree, "
                           f"the history has {len(ctx.tokens)}) and this cache policy cannot forget tokens: "
                           "send a prompt that continues the history, or start a new session")
        try:
            ctx.state.rewind(ctx.fed - keep)
        except ValueError as e:  # a cache that dropped old keys (LongNet segments) cannot go back that far
            raise Mismatch(str(e)) from None
    extra.pop("pending", None)
    ctx.tokens = list(prompt)
    return prompt[keep:]


def reusable(ctx: Context, prompt: list[int]) -> int:
    """How many of ``prompt``'s tokens ``resume`` would not feed again (0: none)."""
    same = common_prefix(ctx.tokens, prompt)
    if same == len(ctx.tokens) and (same < len(prompt) or "pending" in ctx.state.extra):
        return ctx.fed
    keep = min(same, ctx.fed, len(prompt) - 1)
    return keep if keep == ctx.fed or can_rewind(ctx.state) else 0


class PrefixCache:
    """The last ``size`` finished contexts in RAM, for requests without a session: a prompt
    that shares a prefix with one starts from a fork of it (the entry stays for others)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[int, Context] = OrderedDict()
        self._next = 0

    def take(self, prompt: list[int]) -> Context | None:
        """A fork of the entry that saves the most prompt tokens, or None."""
        best, saved = None, 0
        for key, ctx in self._entries.items():
            n = reusable(ctx, prompt)
            if n > saved:
                best, saved = key, n
        if best is None:
            return None
        self._entries.move_to_end(best)
        return self._entries[best].fork()

    def put(self, ctx: Context) -> None:
        """Keep ``ctx`` (the caller gives it up), dropping the least recently used entry."""
        if self.size <= 0:
            return
        if can_rewind(ctx.state):  # then an entry whose tokens the new one extends adds nothing
            for key in [k for k, c in self._entries.items() if common_prefix(c.tokens, ctx.tokens) == len(c.tokens)]:
                del self._entries[key]
        self._entries[self._next] = ctx
        self._next += 1
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

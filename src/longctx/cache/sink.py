"""Attention-sink key/value cache (StreamingLLM, Xiao et al. 2023, §3.2): the first tokens
of the stream plus a window of the most recent ones, in constant memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from longctx.cache.base import LayerState
from longctx.cache.policy import DEFAULT_SINKS, DEFAULT_WINDOW

# What state_dict's keys mean, recorded in its "format" entry: 2 = as the layer gave them
# (RoPE: rotated at their stream positions), the sinks as first cached.  A state without the
# entry holds keys before RoPE, which this cache cannot continue.
STATE_FORMAT = 2


class SinkKVCache(LayerState):
    """Keys and values of the first ``n_sink`` tokens (the attention sinks) and of the last
    ``window`` tokens, ``(batch, kept, kv_heads, head_dim)`` with ``kept = min(seq_len,
    n_sink + window)``; ``n_sink = 0`` is plain window attention.

    Keys are stored as the layer gives them.  With RoPE the layer rotates each token once,
    at its position in the stream: the window's distances to a query are the same inside the
    cache as in the stream.  Only the sinks' distance to the window changes as tokens are
    evicted; ``update(..., shift_sinks=f)`` rewrites the sinks' rows of the returned keys as
    ``f(sinks as first cached, evicted)`` (the layer rotates them on by the number of evicted
    tokens), so positions are those inside the cache (paper §3.2) at O(n_sink) per step
    instead of re-rotating every kept key.

    Cache order is sinks first, then the window oldest to newest, and ``update`` returns it
    as one contiguous slice of storage (no copy).  Storage holds ``2 * (n_sink + window)``
    positions, allocated on the first update and never grown: evicting the oldest window
    token slides the few sinks one slot forward over it, and only when the slice reaches
    the end of storage is the kept part moved back to the front, once every
    ``n_sink + window`` tokens; eviction is O(n_sink) per token plus an amortised O(1)
    share of that move, and memory is constant however long the stream.

    With ``keep_undo`` an update that evicts copies the evicted token's key and value first
    (one row; the slide of the sinks overwrites it), so ``undo_step`` can put it back.
    """

    def __init__(self, batch_size: int, n_sink: int = DEFAULT_SINKS, window: int = DEFAULT_WINDOW) -> None:
        if not isinstance(n_sink, int) or isinstance(n_sink, bool) or n_sink < 0:
            raise ValueError(f"the number of attention sinks must be an integer >= 0; got {n_sink!r}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"the cache window must be an integer >= 1; got {window!r}")
        self.batch_size, self.n_sink, self.window = batch_size, n_sink, window
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._sink_k: torch.Tensor | None = None  # the sinks' keys as first cached, once eviction began
        self._lo = self._end = 0  # the kept tokens are storage[_lo:_end], in cache order
        self.seq_len = 0  # tokens seen
        self._keep_undo = False
        # Before the last update: seq_len and the evicted (k, v) rows, or None.
        self._undo: tuple | None = None

    @property
    def capacity(self) -> int:
        """The most tokens kept: ``n_sink + window``."""
        return self.n_sink + self.window

    @property
    def evicted(self) -> int:
        """Tokens dropped from between the sinks and the window so far."""
        return self.seq_len - (self._end - self._lo)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, shift_sinks: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``k``, ``v`` ``(batch, time, kv_heads, head_dim)``; return the kept keys and
        values ``(batch, kept, kv_heads, head_dim)`` in cache order, the new tokens last.
        They are views of the storage, valid until the next update.  Once tokens have been
        evicted, ``shift_sinks(sink_keys, evicted)`` (if given) gives the sinks' rows of the
        returned keys from their keys as first cached ``(batch, n_sink, kv_heads, head_dim)``.

        Several tokens at once only while they fit without eviction (a prompt shorter than
        the cache): each query of a longer chunk would need its own window.
        """
        self._check_update(k, v)
        new = k.shape[1]
        if new > 1 and self.seq_len + new > self.capacity:
            room = self.capacity - self.seq_len
            raise ValueError(
                f"the prompt ({new} tokens) is longer than the cache window: {max(room, 0)} more tokens fit before "
                f"eviction starts ({self.n_sink} sinks + window {self.window}, {self.seq_len} tokens seen); feed it "
                f"in pieces of at most {max(room, 1)} tokens (one at a time once the cache is full), or enlarge "
                "the window"
            )
        if self._k is None:
            self._k, self._v = self._storage(k), self._storage(v)
        evicting = self.seq_len + new > self.capacity
        if self._keep_undo:
            row = self._lo + self.n_sink  # the oldest window token, evicted by this update
            evicted = (self._k[:, row : row + 1].clone(), self._v[:, row : row + 1].clone()) if evicting else None
            self._undo = (self.seq_len, evicted)
        if evicting:
            self._evict_oldest()
        self._k[:, self._end : self._end + new] = k
        self._v[:, self._end : self._end + new] = v
        self._end += new
        self.seq_len += new
        if shift_sinks is not None and self._sink_k is not None:
            self._k[:, self._lo : self._lo + self.n_sink] = shift_sinks(self._sink_k, self.evicted)
        return self._k[:, self._lo : self._end], self._v[:, self._lo : self._end]

    def _check_update(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape[0] != self.batch_size:
            raise ValueError(f"cache was made for batch size {self.batch_size}; got {k.shape[0]}")
        if self._k is not None and (self._k.shape[2:] != k.shape[2:] or self._v.shape[2:] != v.shape[2:]):
            raise ValueError(
                f"cache holds keys/values of shape (..., {', '.join(map(str, self._k.shape[2:]))}); "
                f"got {tuple(k.shape)}"
            )
        # Autograd would keep every step's graph (and the storage versions it saw) alive
        # for the whole stream, so memory would grow after all.
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise ValueError("a sink cache is for inference and does not record gradients; run the model under "
                             "torch.no_grad() (generate/stream do)")

    def _storage(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 2 capacity, kv_heads, head_dim)``, a view of head-major storage as in
        ``KVCache`` (each head's keys contiguous for the attention matmuls)."""
        return x.new_empty(self.batch_size, x.shape[2], 2 * self.capacity, x.shape[3]).transpose(1, 2)

    def _evict_oldest(self) -> None:
        """Drop the oldest window token (just after the sinks), leaving the kept slice
        contiguous with room for one token at its end."""
        n, lo = self.n_sink, self._lo
        if self._sink_k is None and n:
            self._sink_k = self._k[:, lo : lo + n].clone()  # rows about to be shifted are still as cached
        room = self._end < self._k.shape[1]
        for buf in (self._k, self._v):
            if room:
                # Slide the sinks one slot forward, over the evicted token (the ranges
                # overlap, hence the clone of these few rows).
                buf[:, lo + 1 : lo + 1 + n] = buf[:, lo : lo + n].clone()
            else:
                # End of storage: move sinks and the rest of the window to the front.
                # lo = capacity here, so source and destination do not overlap.
                buf[:, :n] = buf[:, lo : lo + n]
                buf[:, n : self.capacity - 1] = buf[:, lo + n + 1 : self._end]
        self._lo, self._end = (lo + 1, self._end) if room else (0, self.capacity - 1)

    def replace_sinks(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make ``k``, ``v`` ``(batch, n_sink, kv_heads, head_dim)`` the sinks, keys as first
        cached (RoPE at positions ``0 .. n_sink - 1``): a memory-token model's new memory
        (``longctx.model.memory``).  The window stays as it is."""
        if self.seq_len < self.n_sink:
            raise ValueError(f"the cache holds {self.seq_len} tokens, fewer than its {self.n_sink} sinks")
        if k.shape != (self.batch_size, self.n_sink, *self._k.shape[2:]) or v.shape != k.shape:
            raise ValueError(f"new sinks must be (batch, n_sink, kv_heads, head_dim) = "
                             f"{(self.batch_size, self.n_sink, *self._k.shape[2:])}; got {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")
        self._k[:, self._lo : self._lo + self.n_sink] = k
        self._v[:, self._lo : self._lo + self.n_sink] = v
        if self._sink_k is not None:  # the next update rotates the sinks' rows on from here
            self._sink_k = k.clone()
        self._undo = None

    def keep_undo(self) -> None:
        self._keep_undo = True

    def undo_step(self) -> None:
        if self._undo is None:
            raise self._nothing_to_undo()
        seq_len, evicted = self._undo
        self._undo = None
        if seq_len == 0:
            self.reset()
            return
        if evicted is None:  # the new tokens were appended at the end, nothing else moved
            self._end -= self.seq_len - seq_len
        else:
            # Cache order before the step: sinks (as first cached: shift_sinks rotates them
            # anew on every update), the evicted token, the window without the newest token.
            # _sink_k stays set when eviction began with this step: it holds those same rows.
            n, kept_k, kept_v = self.n_sink, self._k[:, self._lo : self._end], self._v[:, self._lo : self._end]
            sinks = kept_k[:, :n] if self._sink_k is None else self._sink_k
            k = torch.cat([sinks, evicted[0], kept_k[:, n:-1]], 1)
            v = torch.cat([kept_v[:, :n], evicted[1], kept_v[:, n:-1]], 1)
            self._k[:, : k.shape[1]] = k
            self._v[:, : v.shape[1]] = v
            self._lo, self._end = 0, k.shape[1]
        self.seq_len = seq_len

    def reset(self) -> None:
        self._k = self._v = self._sink_k = None
        self._lo = self._end = self.seq_len = 0
        self._undo = None

    def tensors(self) -> Iterable[torch.Tensor]:
        return [t for t in (self._k, self._v, self._sink_k) if t is not None]

    def fork(self) -> SinkKVCache:
        """An independent copy: updating either cache leaves the other as it was."""
        other = SinkKVCache(self.batch_size, self.n_sink, self.window)
        other.load_state_dict(self.state_dict())
        return other

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept keys (the sinks' as first cached) and values in cache order, the tokens
        seen, the policy and the format.  The entries are named unlike ``KVCache``'s so that
        a dense cache never takes them for keys at positions ``0 .. kept - 1``."""
        if self._k is None:
            return {}
        kept_k = self._k[:, self._lo : self._end].clone()
        if self._sink_k is not None:
            kept_k[:, : self.n_sink] = self._sink_k
        return {
            "kept_k": kept_k,
            "kept_v": self._v[:, self._lo : self._end].clone(),
            "seq_len": torch.tensor(self.seq_len),
            "policy": torch.tensor([self.n_sink, self.window]),
            "format": torch.tensor(STATE_FORMAT),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if not state:
            return
        if "kept_k" not in state:
            raise ValueError(f"saved layer state (entries {sorted(state)}) is not a sink cache's; load it with "
                             "the cache options it was made with (e.g. cache='dense')")
        if int(state.get("format", 1)) != STATE_FORMAT:
            raise ValueError("this sink-cache session holds keys before RoPE (its state has no format 2 entry), "
                             "which this cache cannot continue: start a new session")
        n_sink, window = (int(x) for x in state["policy"])
        if (n_sink, window) != (self.n_sink, self.window):
            raise ValueError(f"saved sink cache keeps {n_sink} sinks + window {window}; this one {self.n_sink} + "
                             f"{self.window}: load it with the same sinks and window")
        k, v, seq_len = state["kept_k"], state["kept_v"], int(state["seq_len"])
        if k.shape[0] != self.batch_size:
            raise ValueError(f"saved cache has batch size {k.shape[0]}; this one {self.batch_size}")
        if k.shape[1] != min(seq_len, self.capacity):
            raise ValueError(f"saved sink cache keeps {k.shape[1]} tokens after {seq_len} seen; it should keep "
                             f"{min(seq_len, self.capacity)}")
        self._k, self._v = self._storage(k), self._storage(v)
        self._k[:, : k.shape[1]] = k
        self._v[:, : v.shape[1]] = v
        self._end, self.seq_len = k.shape[1], seq_len
        self._undo = None  # a restored state has no step to undo
        if self.evicted and self.n_sink:
            self._sink_k = k[:, : self.n_sink].clone()

"""Key/value cache of one attention layer."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from longctx.cache.base import LayerState


class KVCache(LayerState):
    """Keys and values of positions ``start .. seq_len - 1``, ``(batch, seq_len - start,
    kv_heads, head_dim)``, grown in place.

    ``seq_len`` counts every token seen; ``start`` is 0 unless the layer drops keys it can
    no longer use (``trim``, e.g. LongNet's finished segments).  Storage doubles when full
    (after dropping trimmed keys), so appending one token is O(1) amortised instead of a
    re-concatenation of the whole cache per token.  Keys are stored as the layer uses them
    (after RoPE, which depends only on the absolute position).  When the new keys carry
    gradients (training through a state, e.g. truncated backprop over segments) the cache
    is concatenated out of place so autograd sees every step.

    Storage is head-major, ``(batch, kv_heads, capacity, head_dim)``, seen through a
    transposed view, so ``update`` returns ``(batch, time, kv_heads, head_dim)`` views in
    which each head's keys are one contiguous ``(time, head_dim)`` matrix: what the matmuls
    of a decoding step read, in place (``longctx.ops.attention``).

    With ``keep_undo`` each update remembers ``seq_len`` and ``start`` before it: undoing a
    step restores both, the keys a windowed layer trimmed after the step included (they are
    still in storage: only ``_grow`` moves rows, and it keeps every row from ``start`` on).
    """

    def __init__(self, batch_size: int, max_len: int | None = None) -> None:
        self.batch_size = batch_size
        self.capacity_hint = max_len or 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._base = 0  # absolute position of _k[:, 0]
        self.start = 0
        self.seq_len = 0
        self._keep_undo = False
        self._undo: tuple[int, int] | None = None  # (seq_len, start) before the last update

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ``(batch, time, kv_heads, head_dim)``; return the kept keys and
        values (positions ``start .. seq_len - 1``)."""
        if k.shape[0] != self.batch_size:
            raise ValueError(f"cache was made for batch size {self.batch_size}; got {k.shape[0]}")
        if self._keep_undo:
            self._undo = (self.seq_len, self.start)
        new = k.shape[1]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            if self._k is not None:
                k, v = torch.cat([self._live(self._k), k], dim=1), torch.cat([self._live(self._v), v], dim=1)
            self._k, self._v, self._base = k, v, self.start
            self.seq_len += new
            return self._k, self._v
        stored = self.seq_len - self._base
        if self._k is None or stored + new > self._k.shape[1] or self._k.shape[2:] != k.shape[2:]:
            self._grow(k, v, self.seq_len - self.start + new)
            stored = self.seq_len - self._base
        self._k[:, stored : stored + new] = k
        self._v[:, stored : stored + new] = v
        self.seq_len += new
        return self._live(self._k), self._live(self._v)

    def head_major(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The storage itself, keys and values ``(batch, kv_heads, capacity, head_dim)``
        (contiguous), and the storage rows ``lo .. hi - 1`` that hold the kept positions
        ``start .. seq_len - 1``: for kernels that read the cache in place."""
        if self._k is None:
            raise ValueError("the cache is empty: update it first")
        return self._k.transpose(1, 2), self._v.transpose(1, 2), self.start - self._base, self.seq_len - self._base

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` positions (rejected draft tokens of speculative decoding);
        the storage stays for the next update."""
        if not 0 <= n <= self.seq_len - self.start:
            raise ValueError(f"cannot rewind {n} positions: the cache keeps {self.seq_len - self.start}")
        self.seq_len -= n
        self._undo = None

    def keep_undo(self) -> None:
        self._keep_undo = True

    def undo_step(self) -> None:
        if self._undo is None:
            raise self._nothing_to_undo()
        seq_len, start = self._undo
        if seq_len == 0:
            self.reset()
            return
        self.seq_len, self.start, self._undo = seq_len, start, None

    def trim(self, start: int) -> None:
        """Forget the keys and values before absolute position ``start`` (memory is reused
        on the next growth)."""
        self.start = min(max(self.start, start), self.seq_len)

    def _live(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start - self._base : self.seq_len - self._base]

    def _grow(self, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        """Move the kept keys to the front of storage for ``need`` positions: the same
        storage when it has room, else one of double size."""
        live = self.seq_len - self.start
        old = 0 if self._k is None else self._k.shape[1]
        if self._k is not None and need <= old and self._k.shape[2:] == k.shape[2:]:
            new_k, new_v = self._k, self._v
        else:
            capacity = max(need, 2 * old, self.capacity_hint, 64)
            new_k = k.new_empty(self.batch_size, k.shape[2], capacity, k.shape[3]).transpose(1, 2)
            new_v = v.new_empty(self.batch_size, v.shape[2], capacity, v.shape[3]).transpose(1, 2)
        if live:
            new_k[:, :live] = self._live(self._k).clone()
            new_v[:, :live] = self._live(self._v).clone()
        self._k, self._v, self._base = new_k, new_v, self.start

    def reset(self) -> None:
        self._k = self._v = None
        self.seq_len = self.start = self._base = 0
        self._undo = None

    def tensors(self) -> Iterable[torch.Tensor]:
        return [t for t in (self._k, self._v) if t is not None]

    def fork(self) -> KVCache:
        """An independent copy: updating either cache leaves the other as it was."""
        other = KVCache(self.batch_size, self.capacity_hint)
        other.load_state_dict(self.state_dict())
        return other

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._k is None:
            return {}
        state = {"k": self._live(self._k).clone(), "v": self._live(self._v).clone()}
        if self.start:
            state["start"] = torch.tensor(self.start)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if state:
            if "k" not in state or "v" not in state:
                kind = "an attention-sink or window cache" if "policy" in state else "another kind of state"
                raise ValueError(f"the saved state holds {kind} ({', '.join(sorted(state))}), not a dense KV "
                                 "cache; load it with the cache options it was made with")
            if state["k"].shape[0] != self.batch_size:
                raise ValueError(
                    f"saved cache has batch size {state['k'].shape[0]}; this one {self.batch_size}"
                )
            self.start = self._base = self.seq_len = int(state.get("start", 0))
            self.update(state["k"], state["v"])
            self._undo = None  # a restored state has no step to undo

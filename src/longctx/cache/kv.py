"""Key/value cache of one attention layer."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values seen so far, ``(batch, seq_len, kv_heads, head_dim)``, grown in place.

    Storage doubles when full, so appending one token is O(1) amortised instead of a
    re-concatenation of the whole cache per token.  Keys are stored as the layer uses
    them (after RoPE, which depends only on the absolute position).  When the new keys
    carry gradients (training through a state, e.g. truncated backprop over segments)
    the cache is concatenated out of place so autograd sees every step.
    """

    def __init__(self, batch_size: int, max_len: int | None = None) -> None:
        self.batch_size = batch_size
        self.capacity_hint = max_len or 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.seq_len = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ``(batch, time, kv_heads, head_dim)``; return all keys and values."""
        if k.shape[0] != self.batch_size:
            raise ValueError(f"cache was made for batch size {self.batch_size}; got {k.shape[0]}")
        need = self.seq_len + k.shape[1]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            if self._k is None:
                self._k, self._v = k, v
            else:
                self._k = torch.cat([self._k[:, : self.seq_len], k], dim=1)
                self._v = torch.cat([self._v[:, : self.seq_len], v], dim=1)
            self.seq_len = need
            return self._k, self._v
        if self._k is None or need > self._k.shape[1] or self._k.shape[2:] != k.shape[2:]:
            self._grow(k, v, need)
        self._k[:, self.seq_len : need] = k
        self._v[:, self.seq_len : need] = v
        self.seq_len = need
        return self._k[:, :need], self._v[:, :need]

    def _grow(self, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        capacity = max(need, 2 * (0 if self._k is None else self._k.shape[1]), self.capacity_hint, 64)
        new_k = k.new_empty(self.batch_size, capacity, *k.shape[2:])
        new_v = v.new_empty(self.batch_size, capacity, *v.shape[2:])
        if self._k is not None and self.seq_len:
            new_k[:, : self.seq_len] = self._k[:, : self.seq_len]
            new_v[:, : self.seq_len] = self._v[:, : self.seq_len]
        self._k, self._v = new_k, new_v

    def reset(self) -> None:
        self._k = self._v = None
        self.seq_len = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._k is None:
            return {}
        return {"k": self._k[:, : self.seq_len].clone(), "v": self._v[:, : self.seq_len].clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if state:
            if state["k"].shape[0] != self.batch_size:
                raise ValueError(
                    f"saved cache has batch size {state['k'].shape[0]}; this one {self.batch_size}"
                )
            self.update(state["k"], state["v"])

"""Causal multi-head attention mixer (MHA / GQA / MQA) with RoPE, ALiBi or no positions."""

from __future__ import annotations

import torch
from torch import nn

from longctx.cache.kv import KVCache
from longctx.cache.sink import SinkKVCache
from longctx.layers.registry import register_mixer
from longctx.ops.alibi import alibi_slopes
from longctx.ops.attention import attention
from longctx.ops.rope import rope

CACHE_POLICIES = ("dense", "window", "sinks")


@register_mixer("attention")
class Attention(nn.Module):
    """``x (batch, time, d_model) -> (batch, time, d_model)``.

    With a ``KVCache`` state, new tokens sit at positions ``state.seq_len ..`` and attend
    to everything cached; prefill of many tokens and a one-token step are one code path.
    With a ``SinkKVCache`` (``init_state(cache="sinks")`` or ``"window"``), new tokens attend
    to the kept tokens only and positions are counted inside the cache (StreamingLLM §3.2):
    RoPE rotates the kept keys at ``0 .. kept - 1`` and the new queries at the last of
    these; ALiBi measures distances in cache order.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.pos, self.rope_theta = config.pos, config.rope_theta
        self.max_seq_len = config.max_seq_len
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=False)
        self.out = nn.Linear(q_dim, config.d_model, bias=False)
        self.out.is_residual_out = True
        self.register_buffer(
            "alibi_slopes", alibi_slopes(self.n_heads) if self.pos == "alibi" else None, persistent=False
        )

    def init_state(
        self, batch_size: int, max_len: int | None = None, cache: str = "dense", sinks: int = 4, window: int = 1020
    ) -> KVCache | SinkKVCache:
        """An empty cache for ``batch_size`` sequences, by policy:

        - ``"dense"``: a ``KVCache`` of every token (``max_len``, when known, sizes it once);
        - ``"sinks"``: a ``SinkKVCache`` of the first ``sinks`` tokens and the last ``window``
          (StreamingLLM; the default 4 + 1020 is the paper's);
        - ``"window"``: the last ``window`` tokens only (``sinks`` is ignored).

        Sink and window caches have a fixed size (``max_len`` is ignored) and refuse
        ``pos = "learned"``: learned embeddings are added to the token embeddings with
        absolute positions before any layer, so cached tokens cannot be re-positioned.
        With ``model.max_seq_len`` set, the cache may hold at most that many positions.
        """
        if cache not in CACHE_POLICIES:
            raise ValueError(f"unknown cache policy {cache!r}; choose one of {', '.join(CACHE_POLICIES)}")
        if cache == "dense":
            return KVCache(batch_size, max_len)
        state = SinkKVCache(batch_size, sinks if cache == "sinks" else 0, window)
        if self.pos == "learned":
            raise ValueError(f"a {cache!r} cache needs positions inside the cache, but pos = 'learned' embeds "
                             "absolute positions in the input; use cache='dense' or a model with rope, alibi or none")
        if self.max_seq_len is not None and state.capacity > self.max_seq_len:
            raise ValueError(f"the cache keeps up to {state.capacity} positions, more than this model's limit of "
                             f"{self.max_seq_len} (model.max_seq_len); use a smaller window or fewer sinks")
        return state

    def forward(self, x: torch.Tensor, state: KVCache | SinkKVCache | None = None) -> torch.Tensor:
        batch, time, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(batch, time, self.n_heads, self.head_dim)
        k = k.view(batch, time, self.n_kv_heads, self.head_dim)
        v = v.view(batch, time, self.n_kv_heads, self.head_dim)
        if isinstance(state, SinkKVCache):
            return self.out(self._attend_in_cache(q, k, v, state).reshape(batch, time, -1))
        start = 0 if state is None else state.seq_len
        if self.pos == "rope":
            positions = self.positions(start, time, x.device)
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        kv_start = 0
        if state is not None:
            kv_start = state.start
            k, v = state.update(k, v)
        out = self.attend(q, k, v, kv_start, state)
        return self.out(out.reshape(batch, time, -1))

    def _attend_in_cache(self, q, k, v, state: SinkKVCache) -> torch.Tensor:
        """Attention of the new tokens to a sink cache, at positions inside the cache: keys
        are cached unrotated because each step shifts the window's positions by one."""
        k, v = state.update(k, v)
        if self.pos == "rope":
            positions = state.positions(q.device)
            q = rope(q, positions[-q.shape[1] :], self.rope_theta)
            k = rope(k, positions, self.rope_theta)
        return self.attend(q, k, v, 0, state)

    # Seams that sequence parallelism (longctx.distributed) replaces on an instance.

    def positions(self, start: int, time: int, device) -> torch.Tensor:
        """Absolute positions ``(time,)`` of the new tokens."""
        return torch.arange(start, start + time, device=device)

    def attend(self, q, k, v, kv_start: int, state: KVCache | SinkKVCache | None) -> torch.Tensor:
        """Causal attention of q ``(batch, time, heads, head_dim)`` to k, v ``(batch, kv_time,
        kv_heads, head_dim)`` starting at absolute position ``kv_start`` (the cache's kept
        part; 0 for a sink cache, whose keys are in cache order at positions ``0 ..``); the
        queries are the last ``time`` positions."""
        return attention(q, k, v, causal=True, alibi_slopes=self.alibi_slopes)[0]

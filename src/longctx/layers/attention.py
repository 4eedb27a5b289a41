"""Causal multi-head attention mixer (MHA / GQA / MQA) with RoPE, ALiBi or no positions."""

from __future__ import annotations

import torch
from torch import nn

from longctx.cache import DEFAULT_SINKS, DEFAULT_WINDOW, KVCache, SinkKVCache, check_policy
from longctx.layers.registry import register_mixer
from longctx.ops.alibi import alibi_slopes
from longctx.ops.attention import attention
from longctx.ops.rope import rope


@register_mixer("attention")
class Attention(nn.Module):
    """``x (batch, time, d_model) -> (batch, time, d_model)``.

    With a ``KVCache`` state, new tokens sit at positions ``state.seq_len ..`` and attend
    to everything cached; prefill of many tokens and a one-token step are one code path.
    With a ``SinkKVCache`` (``init_state(cache="sinks")`` or ``"window"``), new tokens attend
    to the kept tokens only and positions are counted inside the cache (StreamingLLM §3.2):
    with RoPE, distances are those between positions ``0 .. kept - 1`` in cache order (see
    ``_attend_in_cache``); ALiBi measures distances in cache order.

    ``model.attn_window`` (sliding-window attention, Mistral) limits each query to itself
    and the ``attn_window - 1`` tokens before it; a ``KVCache`` then drops the keys no later
    token can see, so decoding memory is bounded by the window.  ``model.rope_scaling``
    scales the RoPE frequencies (``longctx.ops.rope``); with ``"dynamic"`` they follow the
    sequence length at each call and cached keys keep the rotation they were cached with,
    as in transformers, so decoding past the original length differs from one full pass.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.pos, self.rope_theta, self.rope_scaling = config.pos, config.rope_theta, config.rope_scaling
        self.max_seq_len, self.window = config.max_seq_len, config.attn_window
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=config.attn_bias)
        self.out = nn.Linear(q_dim, config.d_model, bias=config.attn_out_bias)
        self.out.is_residual_out = True
        self.register_buffer(
            "alibi_slopes", alibi_slopes(self.n_heads) if self.pos == "alibi" else None, persistent=False
        )

    def init_state(
        self, batch_size: int, max_len: int | None = None, cache: str = "dense", sinks: int = DEFAULT_SINKS,
        window: int = DEFAULT_WINDOW,
    ) -> KVCache | SinkKVCache:
        """An empty cache for ``batch_size`` sequences, by policy:

        - ``"dense"``: a ``KVCache`` of every token (``max_len``, when known, sizes it once);
        - ``"sinks"``: a ``SinkKVCache`` of the first ``sinks`` tokens and the last ``window``
          (StreamingLLM; the defaults ``DEFAULT_SINKS`` + ``DEFAULT_WINDOW`` are the paper's 4 + 1020);
        - ``"window"``: the last ``window`` tokens only (``sinks`` is ignored).

        Sink and window caches have a fixed size (``max_len`` is ignored) and refuse
        ``pos = "learned"``: learned embeddings are added to the token embeddings with
        absolute positions before any layer, so cached tokens cannot be re-positioned.
        With ``model.max_seq_len`` set, the cache may hold at most that many positions.
        """
        if check_policy(cache) == "dense":
            return KVCache(batch_size, max_len)
        state = SinkKVCache(batch_size, sinks if cache == "sinks" else 0, window)
        if self.pos == "learned":
            raise ValueError(f"a {cache!r} cache needs positions inside the cache, but pos = 'learned' embeds "
                             "absolute positions in the input; use cache='dense' or a model with rope, alibi or none")
        if self.max_seq_len is not None and state.capacity > self.max_seq_len:
            raise ValueError(f"the cache keeps up to {state.capacity} positions, more than this model's limit of "
                             f"{self.max_seq_len} (model.max_seq_len); use a smaller window or fewer sinks")
        if self.window is not None and state.capacity > self.window:
            raise ValueError(f"the cache keeps up to {state.capacity} tokens, more than this model's attention "
                             f"window of {self.window} (model.attn_window) lets a query see; use sinks + window <= "
                             f"{self.window}, or cache='dense' (which keeps only the window already)")
        return state

    def forward(self, x: torch.Tensor, state: KVCache | SinkKVCache | None = None) -> torch.Tensor:
        batch, time, _ = x.shape
        qkv = self.qkv(x)
        if isinstance(state, SinkKVCache):
            return self.out(self._attend_in_cache(qkv, state).reshape(batch, time, -1))
        start = 0 if state is None else state.seq_len
        positions = self.positions(start, time, x.device) if self.pos == "rope" else None
        q, k, v = self._heads(qkv, positions, start + time)
        kv_start = 0
        if state is not None:
            kv_start = state.start
            k, v = state.update(k, v)
        out = self.attend(q, k, v, kv_start, state)
        if self.window is not None and isinstance(state, KVCache):
            state.trim(state.seq_len - self.window + 1)  # the next query sees no key before this
        return self.out(out.reshape(batch, time, -1))

    def _heads(self, qkv: torch.Tensor, positions: torch.Tensor | None, seq_len: int):
        """``qkv (batch, time, (heads + 2 kv_heads) head_dim)`` -> q ``(batch, time, heads,
        head_dim)``, k and v ``(batch, time, kv_heads, head_dim)``; with ``positions``, q and k
        rotated by RoPE in one call (they are adjacent in ``qkv``)."""
        batch, time, _ = qkv.shape
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        qk = qkv[..., : (heads + kv_heads) * dim].view(batch, time, heads + kv_heads, dim)
        if positions is not None:
            qk = self._rope(qk, positions, seq_len)
        v = qkv[..., (heads + kv_heads) * dim :].view(batch, time, kv_heads, dim)
        return qk[:, :, :heads], qk[:, :, heads:], v

    def _rope(self, x: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        return rope(x, positions, self.rope_theta, scaling=self.rope_scaling, seq_len=seq_len)

    def _attend_in_cache(self, qkv, state: SinkKVCache) -> torch.Tensor:
        """Attention of the new tokens to a sink cache, at positions inside the cache.

        RoPE scores depend on distances only, so new queries and keys are rotated once, at
        their positions in the stream: a window key's distance to a query is the same in the
        stream as in the cache.  A sink's is not (the tokens between them were evicted): the
        cache rotates the sinks on by the number of evicted tokens (``shift_sinks``), which
        puts them at positions ``0 .. n_sink - 1`` of a cache whose window follows them.
        So a step rotates O(n_sink) keys, not every kept one; the fp64 angles of
        ``longctx.ops.rope`` keep stream positions in the millions exact."""
        if self.pos != "rope":
            q, k, v = self._heads(qkv, None, 0)
            k, v = state.update(k, v)
            return self.attend(q, k, v, 0, state)
        time = qkv.shape[1]
        span = min(state.seq_len + time, state.capacity)  # the cache's length after this update
        q, k, v = self._heads(qkv, self.positions(state.seq_len, time, qkv.device), span)

        def shift_sinks(sinks: torch.Tensor, evicted: int) -> torch.Tensor:
            return self._rope(sinks, torch.full((sinks.shape[1],), evicted, device=sinks.device), span)

        k, v = state.update(k, v, shift_sinks)
        return self.attend(q, k, v, 0, state)

    # Seams that sequence parallelism (longctx.distributed) replaces on an instance.

    def positions(self, start: int, time: int, device) -> torch.Tensor:
        """Absolute positions ``(time,)`` of the new tokens."""
        return torch.arange(start, start + time, device=device)

    def attend(self, q, k, v, kv_start: int, state: KVCache | SinkKVCache | None) -> torch.Tensor:
        """Causal attention of q ``(batch, time, heads, head_dim)`` to k, v ``(batch, kv_time,
        kv_heads, head_dim)`` starting at absolute position ``kv_start`` (the cache's kept
        part; 0 for a sink cache, whose keys are in cache order at positions ``0 ..``); the
        queries are the last ``time`` positions; ``model.attn_window`` applies."""
        return attention(q, k, v, causal=True, alibi_slopes=self.alibi_slopes, window=self.window, with_lse=False)[0]

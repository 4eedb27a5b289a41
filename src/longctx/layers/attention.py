"""Causal multi-head attention mixer (MHA / GQA / MQA) with RoPE, ALiBi or no positions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from longctx.cache import (DEFAULT_SINKS, DEFAULT_WINDOW, RECALL_DEFAULTS, KVCache, RecallCache, SinkKVCache,
                           check_policy)
from longctx.layers.recall import CHUNK, recall_attention
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
    ``_attend_in_cache``); ALiBi measures distances in cache order.  With a ``RecallCache``
    (``init_state(cache="recall")``), ``longctx.layers.recall.recall_attention`` attends to the
    sinks, the window and the blocks retrieved for each chunk of queries.

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
        self.layer_idx, self.context_len = layer_idx, config.context_len
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=config.attn_bias)
        self.out = nn.Linear(q_dim, config.d_model, bias=config.attn_out_bias)
        self.out.is_residual_out = True
        self.register_buffer(
            "alibi_slopes", alibi_slopes(self.n_heads) if self.pos == "alibi" else None, persistent=False
        )

    def init_state(
        self, batch_size: int, max_len: int | None = None, cache: str = "dense", sinks: int | None = None,
        window: int | None = None, block: int | None = None, topk: int | None = None,
        repr_tokens: int | None = None, memory_dir: str | Path | None = None, positions: str | None = None,
    ) -> KVCache | SinkKVCache | RecallCache:
        """An empty cache for ``batch_size`` sequences, by policy:

        - ``"dense"``: a ``KVCache`` of every token (``max_len``, when known, sizes it once);
        - ``"sinks"``: a ``SinkKVCache`` of the first ``sinks`` tokens and the last ``window``
          (StreamingLLM; the defaults ``DEFAULT_SINKS`` + ``DEFAULT_WINDOW`` are the paper's 4 + 1020);
        - ``"window"``: the last ``window`` tokens only (``sinks`` is ignored);
        - ``"recall"``: a ``RecallCache`` (InfLLM): ``sinks``, ``window``, and the tokens between
          them in blocks of ``block``, ``topk`` of which each chunk of queries retrieves by
          ``repr_tokens`` representative keys; ``positions`` places the retrieved keys
          (``"fixed"`` or ``"ordered"``); defaults ``RECALL_DEFAULTS``.  With ``memory_dir``
          the blocks of this layer go to memory-mapped files in ``memory_dir/layer_{i}``.

        Sink, window and recall caches need no ``max_len`` and refuse ``pos = "learned"``:
        learned embeddings are added to the token embeddings with absolute positions before
        any layer, so cached tokens cannot be re-positioned.  With ``model.max_seq_len`` or
        ``model.attn_window`` set, a query may reach at most that many positions back; a
        recall query attends to at most ``model.context_len`` tokens (``RecallCache.span``).
        """
        recall = dict(block=block, topk=topk, repr_tokens=repr_tokens, memory_dir=memory_dir, positions=positions)
        given = [name for name, value in recall.items() if value is not None]
        if check_policy(cache) != "recall" and given:
            raise ValueError(f"{', '.join(given)} apply to cache='recall' only; got cache={cache!r}")
        if cache == "dense":
            return KVCache(batch_size, max_len)
        if self.pos == "learned":
            raise ValueError(f"a {cache!r} cache needs positions inside the cache, but pos = 'learned' embeds "
                             "absolute positions in the input; use cache='dense' or a model with rope, alibi or none")
        if cache == "recall":
            return self._recall_state(batch_size, sinks, window, recall)
        n_sink = (DEFAULT_SINKS if sinks is None else sinks) if cache == "sinks" else 0
        state = SinkKVCache(batch_size, n_sink, DEFAULT_WINDOW if window is None else window)
        self._check_reach(state.capacity, "the cache keeps up to {} positions", "a smaller window or fewer sinks")
        return state

    def _recall_state(self, batch_size: int, sinks, window, recall: dict) -> RecallCache:
        given = {"sinks": sinks, "window": window, **recall}
        o = {**RECALL_DEFAULTS, **{name: value for name, value in given.items() if value is not None}}
        if self.pos == "alibi" and o["positions"] == "ordered":
            raise ValueError("ALiBi biases each retrieved key by its distance, one shift for all of them; with "
                             "positions='ordered' the distances differ per key: use positions='fixed'")
        memory = None if recall["memory_dir"] is None else Path(recall["memory_dir"]) / f"layer_{self.layer_idx}"
        state = RecallCache(batch_size, o["sinks"], o["window"], o["block"], o["topk"], o["repr_tokens"], memory,
                            o["positions"])
        # A chunk's last query reaches back over the window and the chunk before it.
        self._check_reach(state.window + CHUNK, "recall attention reaches back up to {} positions (the window "
                          f"and a chunk of {CHUNK} queries)", "a smaller window")
        if self.context_len is not None and state.span > self.context_len:  # recall keeps the model in it
            fit = (self.context_len - state.n_sink - state.window) // state.block - 1
            raise ValueError(f"a query would attend to up to {state.span} tokens (sinks, {state.topk} blocks of "
                             f"{state.block}, pending tokens, the window), more than the {self.context_len} this "
                             "model was trained on (model.context_len); "
                             + (f"retrieve at most {fit} blocks" if fit >= 1 else "use a smaller window"))
        return state

    def _check_reach(self, reach: int, what: str, fix: str) -> None:
        """Refuse a cache whose queries reach back farther than ``model.max_seq_len`` or
        ``model.attn_window`` (``what`` formats ``reach``)."""
        if self.max_seq_len is not None and reach > self.max_seq_len:
            raise ValueError(f"{what.format(reach)}, more than this model's limit of {self.max_seq_len} "
                             f"(model.max_seq_len); use {fix}")
        if self.window is not None and reach > self.window:
            raise ValueError(f"{what.format(reach)}, more than this model's attention window of {self.window} "
                             f"(model.attn_window) lets a query see; use {fix}, or cache='dense' (which keeps "
                             "only the window already)")

    def forward(self, x: torch.Tensor, state: KVCache | SinkKVCache | RecallCache | None = None) -> torch.Tensor:
        batch, time, _ = x.shape
        return self.out(self.mix(self.qkv(x), state).reshape(batch, time, -1))

    def mix(self, qkv: torch.Tensor, state: KVCache | SinkKVCache | RecallCache | None = None) -> torch.Tensor:
        """The attention between the projections: ``qkv (batch, time, (heads + 2 kv_heads)
        head_dim)`` (``self.qkv``'s output) -> ``(batch, time, heads, head_dim)``, before the
        output projection; positions, the cache update and attention.  Batched decoding
        (``longctx.generation.batched``) calls it per sequence between projections it
        batches."""
        if isinstance(state, SinkKVCache):
            return self._attend_in_cache(qkv, state)
        if isinstance(state, RecallCache):
            return recall_attention(self, *self._heads(qkv, None, 0), state)
        time = qkv.shape[1]
        start = 0 if state is None else state.seq_len
        positions = self.positions(start, time, qkv.device) if self.pos == "rope" else None
        q, k, v = self._heads(qkv, positions, start + time)
        kv_start = 0
        if state is not None:
            kv_start = state.start
            k, v = state.update(k, v)
        out = self.attend(q, k, v, kv_start, state)
        if self.window is not None and isinstance(state, KVCache):
            state.trim(state.seq_len - self.window + 1)  # the next query sees no key before this
        return out

    def _heads(self, qkv: torch.Tensor, positions: torch.Tensor | None, seq_len: int):
        """``qkv (batch, time, (heads + 2 kv_heads) head_dim)`` -> q ``(batch, time, heads,
        head_dim)``, k and v ``(batch, time, kv_heads, head_dim)``; with ``positions``, q and k
        rotated by RoPE in one call (they are adjacent in ``qkv``)."""
        batch, time, _ = qkv.shape
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        qk = qkv[..., : (heads + kv_heads) * dim].view(batch, time, heads + kv_heads, dim)
        if positions is not None:
            qk = self.rotate(qk, positions, seq_len)
        v = qkv[..., (heads + kv_heads) * dim :].view(batch, time, kv_heads, dim)
        return qk[:, :, :heads], qk[:, :, heads:], v

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """RoPE of ``x (batch, time, heads, head_dim)`` at ``positions (time,)`` in a sequence of
        ``seq_len`` tokens (which ``"dynamic"`` scaling follows), with this layer's theta and scaling."""
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
            return self.rotate(sinks, torch.full((sinks.shape[1],), evicted, device=sinks.device), span)

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

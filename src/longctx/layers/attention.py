"""Causal multi-head attention mixer (MHA / GQA / MQA) with RoPE, ALiBi or no positions."""

from __future__ import annotations

import torch
from torch import nn

from longctx.cache.kv import KVCache
from longctx.layers.registry import register_mixer
from longctx.ops.alibi import alibi_slopes
from longctx.ops.attention import attention
from longctx.ops.rope import rope


@register_mixer("attention")
class Attention(nn.Module):
    """``x (batch, time, d_model) -> (batch, time, d_model)``.

    With a ``KVCache`` state, new tokens sit at positions ``state.seq_len ..`` and attend
    to everything cached; prefill of many tokens and a one-token step are one code path.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.pos, self.rope_theta = config.pos, config.rope_theta
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=False)
        self.out = nn.Linear(q_dim, config.d_model, bias=False)
        self.out.is_residual_out = True
        self.register_buffer(
            "alibi_slopes", alibi_slopes(self.n_heads) if self.pos == "alibi" else None, persistent=False
        )

    def init_state(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(batch_size, max_len)

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> torch.Tensor:
        batch, time, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(batch, time, self.n_heads, self.head_dim)
        k = k.view(batch, time, self.n_kv_heads, self.head_dim)
        v = v.view(batch, time, self.n_kv_heads, self.head_dim)
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

    # Seams that sequence parallelism (longctx.distributed) replaces on an instance.

    def positions(self, start: int, time: int, device) -> torch.Tensor:
        """Absolute positions ``(time,)`` of the new tokens."""
        return torch.arange(start, start + time, device=device)

    def attend(self, q, k, v, kv_start: int, state: KVCache | None) -> torch.Tensor:
        """Causal attention of q ``(batch, time, heads, head_dim)`` to k, v ``(batch, kv_time,
        kv_heads, head_dim)`` starting at absolute position ``kv_start`` (the cache's kept
        part); the queries are the last ``time`` positions."""
        return attention(q, k, v, causal=True, alibi_slopes=self.alibi_slopes)[0]

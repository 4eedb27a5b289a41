"""LongNet dilated attention mixer: the attention mixer with ``dilated_attention`` inside."""

from __future__ import annotations

import torch

from longctx.cache.kv import KVCache
from longctx.layers.attention import Attention
from longctx.layers.registry import register_mixer
from longctx.ops.dilated import dilated_attention, first_needed_position


@register_mixer("dilated")
class DilatedAttention(Attention):
    """``x (batch, time, d_model) -> (batch, time, d_model)``, positions as configured (RoPE,
    ALiBi, learned, none), patterns from ``model.dilated_segments`` / ``dilated_rates``.

    Decoding rule: a new token at position t attends, in each pattern (w, r), to the cached
    keys of its own segment ``[w * (t // w), t]`` that the pattern keeps for its head
    (offset ``head % r``), itself included, and the patterns mix as in the full pass, so the
    logits equal the full forward pass.  After each call the cache drops the keys before
    ``first_needed_position(seq_len)``, the first segment start any later token can reach:
    memory is bounded by the longest segment, not the sequence.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.segments, self.rates = list(config.dilated_segments), list(config.dilated_rates)

    def init_state(self, batch_size: int, max_len: int | None = None, cache: str = "dense", **options) -> KVCache:
        """A ``KVCache`` (trimmed as described above); only ``cache="dense"``: the decoding
        rule needs each token's own segments at their absolute positions, which a sink or
        window cache would neither keep nor number that way."""
        if cache != "dense":
            raise ValueError(f"dilated attention layers take only cache='dense' (they bound their cache by segment "
                             f"already); got cache={cache!r}")
        return super().init_state(batch_size, max_len, cache, **options)

    def attend(self, q, k, v, kv_start: int, state: KVCache | None) -> torch.Tensor:
        out, _ = dilated_attention(q, k, v, segment_lengths=self.segments, dilation_rates=self.rates, causal=True,
                                   alibi_slopes=self.alibi_slopes, kv_start=kv_start)
        if state is not None:
            state.trim(first_needed_position(state.seq_len, self.segments))
        return out

"""Make a built ``LanguageModel`` sequence-parallel, without changing its code.

``apply_sequence_parallel(model, group, layout)`` replaces, on each mixer instance, the
seams the model code calls (like torchtitan's parallelize step):

- ``positions``: the global positions of this rank's tokens (RoPE, learned embeddings);
- attention: ``attend`` -> ``ring_attention``;
- dilated: ``attend`` -> ``distributed_dilated_attention`` (contiguous layout);
- mamba / mamba2: ``conv`` -> a causal conv per local chunk continued from the tokens
  before it (``previous_tokens``), ``scan`` -> ``sequence_parallel_scan`` / ``_ssd``.

Afterwards each rank calls ``model(local_ids)`` on its shard (``shard_sequence``) and gets
its shard's logits.  Every parameter's gradient on a rank is that rank's tokens' share:
``all_reduce_gradients`` sums them, giving the full-sequence gradient on every rank.
States (KV caches, SSM states) are single-process: generate with a plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx.distributed.dilated import distributed_dilated_attention
from longctx.distributed.layout import check_layout, local_positions
from longctx.distributed.ring import ring_attention
from longctx.distributed.ssm import local_chunks, previous_tokens, sequence_parallel_scan, sequence_parallel_ssd
from longctx.layers.attention import Attention
from longctx.layers.dilated import DilatedAttention
from longctx.layers.mamba import Mamba, causal_conv
from longctx.layers.mamba2 import Mamba2


def _no_state(state, name: str) -> None:
    if state is not None:
        raise ValueError(f"a sequence-parallel {name} layer runs without a state (KV cache / SSM state); "
                         "generate with a single-process model loaded from the same weights")


def apply_sequence_parallel(model, group=None, layout: str = "contiguous"):
    """Make ``model`` (a ``LanguageModel``) run on sequences split over ``group`` in ``layout``;
    returns the same object.  Raises ``ValueError`` for what cannot run split: ALiBi
    (ring attention takes no bias), sliding-window attention, dynamic RoPE scaling, dilated
    layers with the zigzag layout, unknown mixers."""
    check_layout(layout)
    if model.config.sink_token:
        raise ValueError("sequence parallelism does not support model.sink_token (the sink is prepended to "
                         "the whole sequence, not to each shard); train it in one process")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _check_splittable(model.config)

    def positions(start: int, time: int, device) -> torch.Tensor:
        return start + local_positions(time * world, rank, world, layout, device=device)

    model.positions = positions
    for block in model.blocks:
        mixer = block.mixer
        if isinstance(mixer, DilatedAttention):
            if layout != "contiguous":
                raise ValueError("dilated layers need layout='contiguous' (LongNet's distributed algorithm "
                                 "splits the sequence into consecutive shards)")
            mixer.attend = _dilated_attend(mixer, group)
        elif isinstance(mixer, Attention):
            mixer.attend = _ring_attend(group, layout)
        elif isinstance(mixer, (Mamba, Mamba2)):
            mixer.conv = _chunked_conv(mixer, group, layout)
            mixer.scan = _scan(sequence_parallel_scan if isinstance(mixer, Mamba) else sequence_parallel_ssd,
                               group, layout)
        else:
            raise ValueError(f"no sequence-parallel form for mixer {type(mixer).__name__}")
        if isinstance(mixer, Attention):
            mixer.positions = positions
    model.sequence_parallel = {"group": group, "layout": layout, "world": world}
    return model


def _check_splittable(config) -> None:
    """Refuse, before any seam is replaced, what the split seams cannot compute."""
    if config.pos == "alibi":
        raise ValueError("sequence parallelism supports pos = rope, learned or none; ALiBi is not available "
                         "in ring attention")
    if config.attn_window is not None and "attention" in config.layers:
        raise ValueError("ring attention attends to every earlier token, so it cannot apply model.attn_window "
                         "(sliding-window attention); run sliding-window models in one process")
    if (config.rope_scaling or {}).get("rope_type") == "dynamic":
        raise ValueError("dynamic RoPE scaling depends on the whole sequence's length, which a rank's shard does "
                         "not give; run it in one process")


def _ring_attend(group, layout):
    def attend(q, k, v, kv_start, state):
        _no_state(state, "attention")
        return ring_attention(q, k, v, group=group, causal=True, layout=layout)[0]

    return attend


def _dilated_attend(mixer, group):
    def attend(q, k, v, kv_start, state):
        _no_state(state, "dilated")
        return distributed_dilated_attention(q, k, v, segment_lengths=mixer.segments, dilation_rates=mixer.rates,
                                             group=group, causal=True, alibi_slopes=mixer.alibi_slopes)[0]

    return attend


def _chunked_conv(mixer, group, layout):
    """The causal conv of each local chunk, continued from the tokens before it."""

    def conv(x, prefix):
        _no_state(prefix, "state-space")
        width = mixer.conv1d.weight.shape[-1] - 1
        seq = x.transpose(1, 2)  # (batch, time, channels): previous_tokens' layout
        outs = []
        for chunk, prev in zip(local_chunks(seq, layout), previous_tokens(seq, width, group=group, layout=layout)):
            out, _ = causal_conv(chunk.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, prev.transpose(1, 2))
            outs.append(out)
        return torch.cat(outs, dim=-1), None

    return conv


def _scan(fn, group, layout):
    def scan(*args, initial_state=None, chunk_size=None, **kwargs):
        _no_state(initial_state, "state-space")
        if chunk_size is not None:
            kwargs["chunk_size"] = chunk_size
        return fn(*args, **kwargs, group=group, layout=layout), None

    return scan


def all_reduce_gradients(model, group=None) -> None:
    """Sum every parameter's gradient over ``group`` (each rank holds its tokens' share)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()

"""Memory tokens: the Recurrent Memory Transformer (Bulatov et al. 2022) on any stack of mixers.

A model with ``model.memory_tokens = M`` and ``model.memory_segment = S`` reads its input
in segments of ``S`` tokens.  Each segment is one sequence for the layers, its positions
starting at 0::

    [ read memory (M) | the segment's tokens (S) | write slots (M) ]

- the read memory is ``M`` vectors ``(M, d_model)``: a learned initial memory
  (``MemoryTokens.init``) for the first segment, else what the segment before wrote;
- the write slots are the ``<mem>`` token's embedding (``model.special_tokens["mem"]``) at
  their positions (RoPE inside attention, or learned position embeddings); their outputs
  after the last block (before the final norm) are the memory the next segment reads;
- attention is causal, so a token sees the read memory and the segment's tokens before
  it, never a write slot; nothing of an earlier segment reaches a layer but the memory.

The logits are the tokens' only, ``(batch, time, vocab)`` as for any model.  Training
backpropagates through ``model.memory_bptt`` segments: the memory is detached after every
``memory_bptt``-th segment written (None: never).

With a state, the layer states hold the current segment (its read memory and the tokens
so far) and ``state.memory`` (``longctx.cache.memory.MemoryState``) the memory it read and
how many of its tokens came.  Input is split at segment boundaries; the piece that completes
a segment is fed with the write slots in the same pass, after which the layer states are
emptied for the next segment.  So token-by-token streaming gives the logits of one pass
over the whole input, and a stream's caches never hold more than ``S + 2M`` positions.

Memory over a rolling window (``init_state(cache="sinks", window=W)``, attention layers
only, inference only: sink caches record no gradients): the seeds' sketch of memory
tokens, a rolling window and attention sinks.  The layers' sink caches keep ``M`` sinks,
which are the memory, and a window of the last ``W`` tokens, which rolls on across
segments instead of being emptied.  The stream starts with the initial memory as its
first ``M`` positions; at the end of each segment the write slots are fed to a fork of
the caches (they see the sinks, the window and each other, and leave no trace), and the
memory they write replaces the sinks: its keys and values at positions ``0 .. M - 1``, as
the memory alone gives them (the read memory of a segment attends to itself only).  Until
the first segment ends and while the window holds the whole segment, this is exactly the
segment-by-segment model; after that, tokens also see the tokens of earlier segments that
are still in the window, which training never showed the model.
"""

from __future__ import annotations

import torch
from torch import nn

from longctx.cache.kv import KVCache
from longctx.cache.memory import MemoryState
from longctx.cache.sink import SinkKVCache


class MemoryTokens(nn.Module):
    """The learned initial memory ``init (memory_tokens, d_model)`` and the segment settings
    of ``config`` (``memory_tokens``, ``memory_segment``, ``memory_bptt``, the ``<mem>`` id)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.count, self.segment, self.bptt = config.memory_tokens, config.memory_segment, config.memory_bptt
        self.mem_id = config.special_token("mem")
        self.init = nn.Parameter(torch.empty(config.memory_tokens, config.d_model))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.init, std=std)

    def cache_options(self, layers: list[str], max_len: int | None, options: dict) -> tuple[int | None, dict]:
        """``init_state``'s ``max_len`` and cache options for this model: dense caches, which
        hold one segment, or sink caches whose sinks are the memory (module docstring)."""
        cache = options.get("cache", "dense")
        if cache == "dense":
            return (self.span() if max_len is None else min(max_len, self.span())), options
        if cache != "sinks":
            raise ValueError(f"a model with memory tokens takes cache='dense' (its caches hold one segment, at most "
                             f"{self.span()} positions) or cache='sinks' (the memory as the sinks of a rolling "
                             f"window); got {cache!r}")
        if set(layers) != {"attention"}:
            raise ValueError("memory over a rolling window (cache='sinks') needs a model of attention layers only; "
                             f"this one has {', '.join(sorted(set(layers) - {'attention'}))} layers")
        if options.get("sinks") not in (None, self.count):
            raise ValueError(f"with memory tokens the sinks are the memory: sinks must be {self.count} "
                             f"(model.memory_tokens); got {options['sinks']}")
        return max_len, {**options, "sinks": self.count}

    def span(self) -> int:
        """The most positions a segment holds: read memory, tokens, write slots."""
        return self.segment + 2 * self.count


def memory_forward(model, ids: torch.Tensor, state, last_only: bool = False) -> torch.Tensor:
    """``LanguageModel.forward`` of a memory-token model (module docstring): ``ids (batch,
    time)`` -> logits ``(batch, time, vocab)``, or ``(batch, 1, vocab)`` with ``last_only``;
    ``state`` (``model.init_state``) or None for a fresh input in one call."""
    mem: MemoryTokens = model.memory
    batch, time = ids.shape
    if state is not None and state.memory is None:
        raise ValueError("this model has memory tokens, but the state has no memory: make it with the model's "
                         "init_state")
    if state is not None and isinstance(state.layers[0], SinkKVCache):
        return _rolling_forward(model, ids, state, last_only)
    memory = MemoryState(batch, mem.count) if state is None else state.memory
    layers = [None] * len(model.blocks) if state is None else state.layers
    outs, fed = [], 0
    while fed < time:
        n = min(time - fed, mem.segment - memory.pos)
        read, write = memory.pos == 0, memory.pos + n == mem.segment
        x = model.embed(ids[:, fed : fed + n])
        parts = [x]
        if read:
            first = mem.init if memory.memory is None else memory.memory
            parts.insert(0, first.to(x.dtype).expand(batch, -1, -1))
        if write:
            parts.append(model.embed(torch.full((batch, mem.count), mem.mem_id, device=ids.device)))
        x = torch.cat(parts, 1)
        if model.pos_embed is not None:
            start = 0 if read else mem.count + memory.pos
            x = x + model.pos_embed(model.positions(start, x.shape[1], ids.device))
        for block, layer in zip(model.blocks, layers):
            x = block(x, layer)
        lo = mem.count if read else 0
        outs.append(x[:, lo : lo + n])
        if write:
            memory.write(x[:, -mem.count :], mem.bptt)
            for layer in layers:
                if layer is not None:
                    layer.reset()
        else:
            memory.pos += n
        fed += n
    if state is not None:
        state.seq_len += time
    x = torch.cat(outs, 1) if outs else model.embed(ids)
    return model.lm_head(model.norm(x[:, -1:] if last_only else x))


def _rolling_forward(model, ids: torch.Tensor, state, last_only: bool) -> torch.Tensor:
    """``memory_forward`` through sink caches whose sinks are the memory (module docstring)."""
    mem, memory, caches = model.memory, state.memory, state.layers
    outs, fed = [], 0
    while fed < ids.shape[1]:
        read = caches[0].seq_len == 0  # a fresh stream: the initial memory goes first, as the sinks
        # A sink cache takes several positions at once only while they fit without eviction.
        room = caches[0].capacity - caches[0].seq_len - (mem.count if read else 0)
        n = min(ids.shape[1] - fed, mem.segment - memory.pos, max(room, 1))
        x = model.embed(ids[:, fed : fed + n])
        if read:
            x = torch.cat([mem.init.to(x.dtype).expand(x.shape[0], -1, -1), x], 1)
        for block, cache in zip(model.blocks, caches):
            x = block(x, cache)
        outs.append(x[:, -n:])
        memory.pos += n
        fed += n
        if memory.pos == mem.segment:
            _write_to_sinks(model, state, ids.device)
    state.seq_len += ids.shape[1]
    x = torch.cat(outs, 1) if outs else model.embed(ids)
    return model.lm_head(model.norm(x[:, -1:] if last_only else x))


def _write_to_sinks(model, state, device) -> None:
    """End a segment of a rolling-window stream: the write slots on a fork of the caches,
    then their memory as every layer's sinks."""
    mem, caches = model.memory, state.layers
    batch = state.batch_size
    fork, outs, written = [c.fork() for c in caches], [], 0
    while written < mem.count:
        n = min(mem.count - written, max(fork[0].capacity - fork[0].seq_len, 1))
        x = model.embed(torch.full((batch, n), mem.mem_id, device=device))
        for block, cache in zip(model.blocks, fork):
            x = block(x, cache)
        outs.append(x)
        written += n
    new = torch.cat(outs, 1)
    state.memory.write(new, mem.bptt)
    alone = [KVCache(batch) for _ in caches]  # the memory's keys and values, at positions 0 .. M - 1
    x = new
    for block, cache in zip(model.blocks, alone):
        x = block(x, cache)
    for cache, kv in zip(caches, alone):
        saved = kv.state_dict()
        cache.replace_sinks(saved["k"], saved["v"])

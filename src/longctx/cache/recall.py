"""A training-free context memory for attention layers (InfLLM, Xiao et al. 2024): attention
sinks, a local window, and the tokens between them kept in blocks that each query step
brings back by relevance.

``RecallCache`` holds, per attention layer:

- the sinks: the first ``n_sink`` tokens of the stream (keys before RoPE);
- the window: the last ``window`` tokens, keys before RoPE and rotated at their stream
  positions, with the attention each has received from the queries that saw it;
- ``pending``: tokens that left the window and do not yet fill a block (fewer than
  ``block``); they are attended with the sinks, so no token is ever out of reach;
- blocks: every ``block`` tokens that left the window, in order, each with a
  representative key per KV head, the mean key of its ``repr_tokens`` tokens that
  received the most attention while in the window.  The blocks live in RAM or, with
  ``memory_dir``, in memory-mapped files (``BlockStore``): RAM then holds the sinks, the
  window, the pending tokens, the representatives and the blocks a step reads.

A step retrieves, per stream, the ``topk`` blocks whose representatives have the largest
dot product with the step's mean query (summed over KV heads), in stream order
(``global_kv``); ``longctx.layers.recall`` attends to them.  Until the first token leaves
the window (``seq_len <= n_sink + window``) the window holds every token, as a dense cache.
Tensors are ``(batch, time, kv_heads, head_dim)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from longctx.cache.base import LayerState
from longctx.validation import positive_int

POSITION_SCHEMES = ("fixed", "ordered")


def writable_directory(directory: Path) -> None:
    """Create ``directory`` if needed and check that files can be written in it (``ValueError`` if not)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"the recall memory directory {directory} is not writable ({e}); choose another "
                         "--memory-dir") from None


class BlockStore:
    """Blocks of keys and values ``(batch, block, kv_heads, head_dim)`` each, in order: in
    RAM, or in ``directory`` as two memory-mapped arrays that grow by doubling.

    On disk a block is appended by writing and flushing its data, then replacing
    ``count.json``: a block exists once that file counts it, so an interrupted write
    never reads back a half-written block (``BlockStore.open`` trusts the count only)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, directory: str | Path | None = None) -> None:
        self.shape, self.dtype, self.count = tuple(shape), dtype, 0
        self.directory = None if directory is None else Path(directory)
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._k = self._v = None
        if self.directory is not None:
            writable_directory(self.directory)

    @classmethod
    def open(cls, directory: str | Path) -> BlockStore:
        """The store in ``directory``, with the blocks its ``count.json`` counts."""
        directory = Path(directory)
        meta = json.loads((directory / "count.json").read_text())
        store = cls(tuple(meta["shape"]), getattr(torch, meta["dtype"]), directory)
        store._map(int(meta["capacity"]))
        store.count = int(meta["count"])
        return store

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[0]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one block: keys and values ``(batch, block, kv_heads, head_dim)``."""
        if self.count == self.capacity:
            self._grow(max(16, 2 * self.capacity))
        if self.directory is None:
            self._k[self.count], self._v[self.count] = k, v
        else:
            self._k[self.count], self._v[self.count] = k.numpy(), v.numpy()
            self._k.flush()
            self._v.flush()
            tmp = self.directory / ".count.json.tmp"
            tmp.write_text(json.dumps({"count": self.count + 1, "capacity": self.capacity, "shape": list(self.shape),
                                       "dtype": str(self.dtype).removeprefix("torch.")}))
            os.replace(tmp, self.directory / "count.json")
        self.count += 1

    def _grow(self, capacity: int) -> None:
        if self.directory is not None:
            self._map(capacity)  # a longer file keeps the blocks written where they are
            return
        k = torch.empty(capacity, *self.shape, dtype=self.dtype)
        v = torch.empty_like(k)
        if self.count:
            k[: self.count], v[: self.count] = self._k[: self.count], self._v[: self.count]
        self._k, self._v = k, v

    def _map(self, capacity: int) -> None:
        shape = (capacity, *self.shape)
        arrays = []
        for name in ("keys.bin", "values.bin"):
            path = self.directory / name
            with open(path, "ab") as f:
                if f.tell() < int(np.prod(shape)) * self._np_dtype.itemsize:
                    f.truncate(int(np.prod(shape)) * self._np_dtype.itemsize)
            arrays.append(np.memmap(path, dtype=self._np_dtype, mode="r+", shape=shape))
        self._k, self._v = arrays

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``index (batch, n)`` of each stream -> keys and values ``(batch, n * block,
        kv_heads, head_dim)``, in the order given."""
        batch, n = index.shape
        rows = torch.arange(batch)[:, None].expand(batch, n)
        if self.directory is None:
            k, v = self._k[index, rows], self._v[index, rows]
        else:
            idx, r = index.numpy(), rows.numpy()
            k, v = torch.from_numpy(self._k[idx, r]), torch.from_numpy(self._v[idx, r])
        shape = (batch, n * self.shape[1], *self.shape[2:])
        return k.reshape(shape), v.reshape(shape)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block, copied: ``(count, batch, block, kv_heads, head_dim)`` keys and values."""
        if self.count == 0:
            return torch.empty(0, *self.shape, dtype=self.dtype), torch.empty(0, *self.shape, dtype=self.dtype)
        if self.directory is None:
            return self._k[: self.count].clone(), self._v[: self.count].clone()
        return torch.tensor(np.array(self._k[: self.count])), torch.tensor(np.array(self._v[: self.count]))

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held in RAM (none for a store on disk)."""
        return [] if self.directory is not None or self._k is None else [self._k, self._v]


class RecallCache(LayerState):
    """Sinks + window + retrievable blocks for one attention layer; see the module docstring.

    ``memory_dir``: where this layer's blocks go (memory-mapped; an empty or new directory),
    or None for RAM.  ``positions``: where retrieved keys sit for the query, ``"fixed"``
    (every global key at distance ``window``, InfLLM's) or ``"ordered"`` (the global keys at
    positions ``0 .. G - 1`` in stream order, the query ``window`` after the last).
    """

    def __init__(self, batch_size: int, n_sink: int, window: int, block: int, topk: int, repr_tokens: int,
                 memory_dir: str | Path | None = None, positions: str = "fixed") -> None:
        if not isinstance(n_sink, int) or isinstance(n_sink, bool) or n_sink < 0:
            raise ValueError(f"the number of attention sinks must be an integer >= 0; got {n_sink!r}")
        positive_int("the recall block size", block)
        positive_int("the recall window", window)
        positive_int("the blocks retrieved (topk)", topk)
        positive_int("the representative tokens per block", repr_tokens)
        if window < block:
            raise ValueError(f"the recall window ({window}) is smaller than a block ({block}); use a window of at "
                             "least one block")
        if repr_tokens > block:
            raise ValueError(f"{repr_tokens} representative tokens per block of {block}; use at most {block}")
        if positions not in POSITION_SCHEMES:
            raise ValueError(f"unknown recall position scheme {positions!r}; choose one of "
                             f"{', '.join(POSITION_SCHEMES)}")
        self.batch_size, self.n_sink, self.window, self.block = batch_size, n_sink, window, block
        self.topk, self.repr_tokens, self.positions = topk, repr_tokens, positions
        self.memory_dir = None if memory_dir is None else Path(memory_dir)
        if self.memory_dir is not None:
            writable_directory(self.memory_dir)  # now, not when the first block leaves the window
        self.reset()

    def reset(self) -> None:
        self.seq_len = 0
        self.sink_k = self.sink_v = None  # (batch, <= n_sink, kv_heads, head_dim), keys before RoPE
        self.win_k = self.win_rot = self.win_v = None  # the window: keys before and after RoPE, values
        self.received = None  # (batch, window tokens, kv_heads): attention received
        self.pend_k = self.pend_v = self._pend_r = None  # left the window, not yet a block
        self._reprs = None  # representatives, (room >= blocks, batch, kv_heads, head_dim) fp32
        self.store: BlockStore | None = None

    # ---- what the layer reads

    @property
    def split(self) -> bool:
        """Whether tokens have left the window: attention is then split into global (sinks,
        retrieved blocks, pending) and local (the window); before, the window holds all."""
        return self.sink_k is not None

    @property
    def span(self) -> int:
        """The most tokens one new token attends to: the sinks, ``topk`` blocks, fewer than
        ``block`` pending tokens, the window and itself."""
        return self.n_sink + (self.topk + 1) * self.block + self.window

    @property
    def blocks(self) -> int:
        return 0 if self.store is None else self.store.count

    @property
    def reprs(self) -> torch.Tensor | None:
        """The blocks' representative keys, ``(blocks, batch, kv_heads, head_dim)`` fp32."""
        return None if self._reprs is None else self._reprs[: self.blocks]

    def local_kv(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The window's keys (rotated at their stream positions) and values; before the split,
        every token so far."""
        return self.win_rot, self.win_v

    def global_kv(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys before RoPE and values of [sinks, the ``topk`` blocks most relevant to
        ``query (batch, kv_heads, head_dim)``, pending tokens], in stream order."""
        parts_k, parts_v = [self.sink_k], [self.sink_v]
        if self.blocks:
            parts = self.store.gather(self.retrieve(query))
            parts_k.append(parts[0])
            parts_v.append(parts[1])
        if self.pend_k is not None:
            parts_k.append(self.pend_k)
            parts_v.append(self.pend_v)
        return torch.cat(parts_k, 1), torch.cat(parts_v, 1)

    def retrieve(self, query: torch.Tensor) -> torch.Tensor:
        """Indices ``(batch, min(topk, blocks))`` of the blocks with the largest
        ``sum_h query_h . repr_h``, ascending (stream order)."""
        scores = torch.einsum("bhd,nbhd->bn", query.to(self.reprs.dtype), self.reprs)
        picked = scores.topk(min(self.topk, self.blocks), dim=1).indices
        return picked.sort(dim=1).values

    # ---- what the layer writes

    def add(self, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, received: torch.Tensor | None) -> None:
        """Append new tokens (keys before and after RoPE, values ``(batch, time, kv_heads,
        head_dim)``) after adding ``received (batch, window + time, kv_heads)``, the attention
        the window's tokens and the new ones got from this step's queries; then move what
        left the window into pending tokens and blocks."""
        if k.shape[0] != self.batch_size:
            raise ValueError(f"cache was made for batch size {self.batch_size}; got {k.shape[0]}")
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise ValueError("a recall cache is for inference and does not record gradients; run the model under "
                             "torch.no_grad() (generate/stream do)")
        new = torch.zeros(k.shape[:2] + (k.shape[2],), dtype=torch.float32, device=k.device)
        if self.win_k is None:
            self.win_k, self.win_rot, self.win_v, self.received = k, k_rot, v, new
        else:
            self.win_k = torch.cat([self.win_k, k], 1)
            self.win_rot = torch.cat([self.win_rot, k_rot], 1)
            self.win_v = torch.cat([self.win_v, v], 1)
            self.received = torch.cat([self.received, new], 1)
        if received is not None:
            self.received += received
        self.seq_len += k.shape[1]
        if self.seq_len > self.n_sink + self.window:
            self._evict()

    def _evict(self) -> None:
        """Sinks out of the window first; then the window's oldest tokens beyond ``window``
        become pending, and every full ``block`` of pending tokens a block."""
        if self.sink_k is None:
            n = self.n_sink
            self.sink_k, self.sink_v = self.win_k[:, :n].clone(), self.win_v[:, :n].clone()
            self._drop(n)
        extra = self.win_k.shape[1] - self.window
        if extra <= 0:
            return
        out_k, out_v, out_r = self.win_k[:, :extra], self.win_v[:, :extra], self.received[:, :extra]
        self._drop(extra)
        pend_r = out_r if self.pend_k is None else torch.cat([self._pend_r, out_r], 1)
        self.pend_k = out_k if self.pend_k is None else torch.cat([self.pend_k, out_k], 1)
        self.pend_v = out_v if self.pend_v is None else torch.cat([self.pend_v, out_v], 1)
        self._pend_r = pend_r
        while self.pend_k is not None and self.pend_k.shape[1] >= self.block:
            b = self.block
            self._add_block(self.pend_k[:, :b], self.pend_v[:, :b], self._pend_r[:, :b])
            if self.pend_k.shape[1] == b:
                self.pend_k = self.pend_v = self._pend_r = None
            else:
                self.pend_k, self.pend_v = self.pend_k[:, b:].clone(), self.pend_v[:, b:].clone()
                self._pend_r = self._pend_r[:, b:].clone()

    def _drop(self, n: int) -> None:
        self.win_k, self.win_rot = self.win_k[:, n:].clone(), self.win_rot[:, n:].clone()
        self.win_v, self.received = self.win_v[:, n:].clone(), self.received[:, n:].clone()

    def _add_block(self, k: torch.Tensor, v: torch.Tensor, received: torch.Tensor) -> None:
        """Store a block and its representative: per stream and KV head, the mean key of the
        ``repr_tokens`` tokens that received the most attention."""
        top = received.topk(self.repr_tokens, dim=1).indices  # (batch, repr, kv_heads)
        rep = k.gather(1, top[..., None].expand(-1, -1, -1, k.shape[-1])).float().mean(1)  # (batch, heads, dim)
        if self.store is None:
            self.store = BlockStore(k.shape, k.dtype, self.memory_dir)
        n = self.blocks
        if self._reprs is None or n == self._reprs.shape[0]:  # grow by doubling
            grown = rep.new_empty(max(16, 2 * n), *rep.shape)
            if n:
                grown[:n] = self.reprs
            self._reprs = grown
        self._reprs[n] = rep
        self.store.append(k, v)

    # ---- LayerState

    def tensors(self) -> Iterable[torch.Tensor]:
        held = [self.sink_k, self.sink_v, self.win_k, self.win_rot, self.win_v, self.received, self.pend_k,
                self.pend_v, self._reprs]
        return [t for t in held if t is not None] + ([] if self.store is None else self.store.tensors())

    def _policy(self) -> torch.Tensor:
        return torch.tensor([self.n_sink, self.window, self.block, self.topk, self.repr_tokens,
                             POSITION_SCHEMES.index(self.positions)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every part, the blocks included (copied from disk for a store on disk)."""
        if self.win_k is None:
            return {}
        out = {"seq_len": torch.tensor(self.seq_len), "recall_policy": self._policy(), "win_k": self.win_k,
               "win_rot": self.win_rot, "win_v": self.win_v, "received": self.received}
        for name in ("sink_k", "sink_v", "pend_k", "pend_v"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.pend_k is not None:
            out["pend_r"] = self._pend_r
        if self.blocks:
            out["reprs"] = self.reprs
            out["block_k"], out["block_v"] = self.store.read()
        return {name: t.detach().clone() for name, t in out.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if not state:
            return
        if "recall_policy" not in state:
            raise ValueError(f"saved layer state (entries {sorted(state)}) is not a recall cache's; load it with the "
                             "cache options it was made with")
        if state["recall_policy"].tolist() != self._policy().tolist():
            raise ValueError("the saved recall cache was made with other sinks, window, block size, topk, "
                             "representatives or positions; load it with the same options")
        if state["win_k"].shape[0] != self.batch_size:
            raise ValueError(f"saved cache has batch size {state['win_k'].shape[0]}; this one {self.batch_size}")
        self.seq_len = int(state["seq_len"])
        self.win_k, self.win_rot, self.win_v = state["win_k"], state["win_rot"], state["win_v"]
        self.received = state["received"]
        self.sink_k, self.sink_v = state.get("sink_k"), state.get("sink_v")
        self.pend_k, self.pend_v, self._pend_r = state.get("pend_k"), state.get("pend_v"), state.get("pend_r")
        if "block_k" in state:
            self._reprs = state["reprs"].clone()
            block_k, block_v = state["block_k"], state["block_v"]
            self.store = BlockStore(block_k.shape[1:], block_k.dtype, self.memory_dir)
            for k, v in zip(block_k, block_v):
                self.store.append(k, v)

    def fork(self, memory_dir: str | Path | None = None) -> RecallCache:
        """An independent copy; a cache whose blocks are on disk needs ``memory_dir`` for the copy's."""
        if self.memory_dir is not None and memory_dir is None and self.blocks:
            raise ValueError("this recall cache keeps its blocks on disk: fork it with a memory_dir for the copy")
        other = RecallCache(self.batch_size, self.n_sink, self.window, self.block, self.topk, self.repr_tokens,
                            memory_dir, self.positions)
        other.load_state_dict(self.state_dict())
        return other

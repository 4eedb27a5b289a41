"""The recurrent memory of a memory-token model (``longctx.model.memory``) in a session.

Besides the layers' caches, which hold the current segment only, a stream through a
memory-token model needs the memory the current segment read and how far into the segment
it is.  ``ModelState.memory`` holds it; ``ModelState`` saves it as ``memory.*``, forks and
resets it with the layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class MemoryState:
    """``memory``: the memory the current segment read, ``(batch, memory_tokens, d_model)``,
    or None for the model's learned initial memory (a fresh stream); ``pos``: tokens of the
    current segment seen (0 .. segment - 1: a finished segment writes the next memory and
    starts the next segment at once); ``segments``: segments finished, which truncated
    backpropagation counts (the memory is detached after every ``memory_bptt`` of them)."""

    def __init__(self, batch_size: int, memory_tokens: int) -> None:
        self.batch_size, self.memory_tokens = batch_size, memory_tokens
        self.memory: torch.Tensor | None = None
        self.pos = 0
        self.segments = 0

    def reset(self) -> None:
        """A fresh stream: the initial memory, at the start of the first segment."""
        self.memory, self.pos, self.segments = None, 0, 0

    def write(self, memory: torch.Tensor, bptt: int | None) -> None:
        """End the segment: ``memory (batch, memory_tokens, d_model)`` is what the next one
        reads; detached when ``bptt`` segments have been written since the last detach."""
        self.segments += 1
        if bptt is not None and self.segments % bptt == 0:
            memory = memory.detach()
        self.memory, self.pos = memory, 0

    def tensors(self) -> Iterable[torch.Tensor]:
        return [] if self.memory is None else [self.memory]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"pos": torch.tensor(self.pos), "segments": torch.tensor(self.segments)}
        if self.memory is not None:
            out["memory"] = self.memory.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict``; ``ValueError`` for one of another batch size or memory size."""
        if "pos" not in state or "segments" not in state:
            raise ValueError(f"saved memory state (entries {sorted(state)}) lacks 'pos' or 'segments'; it was not "
                             "written by MemoryState.state_dict")
        memory = state.get("memory")
        if memory is not None and tuple(memory.shape[:2]) != (self.batch_size, self.memory_tokens):
            raise ValueError(f"saved memory has shape {tuple(memory.shape)}: batch {memory.shape[0]} and "
                             f"{memory.shape[1]} memory tokens; this state has batch {self.batch_size} and "
                             f"{self.memory_tokens}")
        self.memory = None if memory is None else memory.clone()
        self.pos, self.segments = int(state["pos"]), int(state["segments"])

    def fork(self) -> MemoryState:
        """An independent copy."""
        other = MemoryState(self.batch_size, self.memory_tokens)
        other.load_state_dict(self.state_dict())
        return other

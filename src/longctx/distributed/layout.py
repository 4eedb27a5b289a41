"""How a sequence is split over the ranks of a process group.

``contiguous``: P chunks, rank r holds chunk r.  ``zigzag``: 2P chunks, rank r holds chunks
r and 2P-1-r (in that order), so that under a causal mask every rank gets the same amount
of work (an early chunk with few keys before it and a late one with many).

A rank's local tensor is its chunks concatenated along the time axis (dim 1 of
``(batch, time, ...)``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")


def num_chunks(world: int, layout: str) -> int:
    check_layout(layout)
    return world if layout == "contiguous" else 2 * world


def chunk_ids(rank: int, world: int, layout: str) -> list[int]:
    """The global chunk indices rank ``rank`` holds, in local order."""
    check_layout(layout)
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def local_positions(total: int, rank: int, world: int, layout: str, device=None) -> torch.Tensor:
    """Global positions ``(local_time,)`` of the tokens rank ``rank`` holds of a sequence of ``total``."""
    n = num_chunks(world, layout)
    if total % n:
        raise ValueError(f"sequence length {total} must be divisible by {n} ({layout} layout over {world} ranks)")
    size = total // n
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunk_ids(rank, world, layout)])


def _world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: torch.Tensor, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's part of the full sequence ``x`` (every rank passes the same ``x``)."""
    rank, world = _world(group)
    pos = local_positions(x.shape[dim], rank, world, layout, device=x.device)
    return x.index_select(dim, pos)


def gather_sequence(x: torch.Tensor, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's part (the inverse of ``shard_sequence``); not differentiable."""
    rank, world = _world(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    total = x.shape[dim] * world
    out = x.new_empty(*x.shape[:dim], total, *x.shape[dim + 1:])
    for r, part in enumerate(parts):
        out.index_copy_(dim, local_positions(total, r, world, layout, device=x.device), part)
    return out

"""LongNet's distributed dilated attention (Ding et al. 2023, §3.1), exact, causal included.

The sequence is split contiguously: rank p holds positions ``[p L, (p + 1) L)``.  Patterns
whose segments fit in a shard (``w <= L``, ``L % w == 0``) are attended locally.  Longer
ones (``w % L == 0``) span several ranks: each rank sparsifies its keys and values first
(the positions a head offset keeps, ``L / r`` of them) and all-gathers only those; its
kept queries then attend to the gathered keys of their segment — up to and including its
own when causal (the official code's causal gather drops the rank's own block).  The
all-gather's backward returns each rank its keys' gradients.  Pieces of both kinds are
mixed by their softmax denominators exactly as in ``dilated_attention``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from longctx.ops.attention import check_qkv
from longctx.ops.dilated import Piece, attend_pieces, check_patterns, plan_pattern


class _GatheredPiece(Piece):
    """Kept queries of one head offset whose keys and values are ``extra[2 index]`` and
    ``extra[2 index + 1]`` (gathered from the ranks of their segment)."""

    def __init__(self, pattern: int, first_query: int, offset: int, rate: int, index: int) -> None:
        def q_view(t):
            return t[:, first_query::rate, offset::rate]

        super().__init__(pattern, q_view, None, offset, rate, None)
        self.index = index

    def inputs(self, q, k, v, heads: int, extra):
        return self.q_view(q), extra[2 * self.index], extra[2 * self.index + 1]

    def add_grads(self, grads, extra_grads, gq, gk, gv, heads: int) -> None:
        self.q_view(grads[0]).add_(gq)
        extra_grads[2 * self.index].add_(gk)
        extra_grads[2 * self.index + 1].add_(gv)


def _first_kept(shard_start: int, w: int, r: int, offset: int) -> int:
    """Local index of the first position of a shard that pattern (w, r) keeps for ``offset``."""
    return (offset - shard_start % w) % r


def _gather_kept(x, rank: int, world: int, local: int, w: int, r: int, offset: int, piece: Piece, heads: int, group):
    """Every rank's kept key positions for ``offset`` (kv heads of its query heads), as a list
    per rank; padded to one length for the all-gather, trimmed after."""
    counts = [len(range(_first_kept(p * local, w, r, offset), local, r)) for p in range(world)]
    mine = piece.kv_heads(x[:, _first_kept(rank * local, w, r, offset)::r], heads)
    pad = max(counts) - counts[rank]
    if pad:
        mine = torch.cat([mine, mine.new_zeros(mine.shape[0], pad, *mine.shape[2:])], dim=1)
    parts = dist_fn.all_gather(mine.contiguous(), group=group)
    return [part[:, :n] for part, n in zip(parts, counts)]


def distributed_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    group=None,
    causal: bool = True,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dilated_attention`` of a sequence split contiguously over the ranks of ``group``.

    Args:
        q: ``(batch, local_time, heads, head_dim)``, this rank's positions
            ``[rank * local_time, (rank + 1) * local_time)``; k, v ``(batch, local_time,
            kv_heads, head_dim)`` of the same positions.  Every rank has the same local_time.
        segment_lengths, dilation_rates, causal, scale, alibi_slopes: as ``dilated_attention``;
            every segment length must divide local_time or be a multiple of it.

    Returns:
        This rank's out ``(batch, local_time, heads, head_dim)`` and lse ``(batch,
        local_time, heads)``: the single-process result at these positions, gradients included.
    """
    segs, rates = check_patterns(segment_lengths, dilation_rates)
    check_qkv(q, k, v)
    batch, local, heads, dim = q.shape
    if k.shape[1] != local:
        raise ValueError(f"q and k/v must hold the same positions; got local lengths {local} and {k.shape[1]}")
    for w in segs:
        if w % local and local % w:
            raise ValueError(
                f"segment length {w} neither divides nor is a multiple of the local length {local}; "
                "choose segment lengths and a sequence length so that one of the two holds"
            )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start = rank * local
    pieces, extra = [], []
    for i, (w, r) in enumerate(zip(segs, rates)):
        if w <= local:
            pieces += plan_pattern(i, w, r, heads, k.shape[2], local, start, start)
            continue
        first_rank = (start // w) * w // local  # the ranks sharing this rank's segment
        last_rank = min(world, first_rank + w // local) - 1
        for o in range(min(r, heads)):
            piece = _GatheredPiece(i, _first_kept(start, w, r, o), o, r, len(extra) // 2)
            kept = [_gather_kept(x, rank, world, local, w, r, o, piece, heads, group) for x in (k, v)]
            if piece.q_view(q).shape[1] == 0:
                continue  # no query of this rank is kept for this offset (its keys were sent all the same)
            upto = rank if causal else last_rank
            extra += [torch.cat(parts[first_rank:upto + 1], dim=1) for parts in kept]
            pieces.append(piece)
    scale = dim**-0.5 if scale is None else float(scale)
    return attend_pieces(q, k, v, pieces, len(segs), causal=causal, scale=scale, alibi_slopes=alibi_slopes,
                         extra=tuple(extra))

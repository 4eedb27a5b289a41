"""Sequence parallelism on torch.distributed: a sequence split over the ranks of a group."""

from longctx.distributed.layout import gather_sequence, local_positions, shard_sequence

__all__ = ["gather_sequence", "local_positions", "shard_sequence"]

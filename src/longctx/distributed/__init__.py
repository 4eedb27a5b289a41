"""Sequence parallelism on torch.distributed: a sequence split over the ranks of a group."""

from longctx.distributed.dilated import distributed_dilated_attention
from longctx.distributed.layout import gather_sequence, local_positions, shard_sequence
from longctx.distributed.ring import ring_attention

__all__ = ["distributed_dilated_attention", "gather_sequence", "local_positions", "ring_attention", "shard_sequence"]

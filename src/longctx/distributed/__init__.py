"""Sequence parallelism on torch.distributed: a sequence split over the ranks of a group."""

from longctx.distributed.dilated import distributed_dilated_attention
from longctx.distributed.layout import gather_sequence, local_positions, shard_sequence
from longctx.distributed.parallelize import all_reduce_gradients, apply_sequence_parallel
from longctx.distributed.ring import ring_attention
from longctx.distributed.ssm import previous_tokens, sequence_parallel_scan, sequence_parallel_ssd

__all__ = [
    "all_reduce_gradients", "apply_sequence_parallel", "distributed_dilated_attention", "gather_sequence",
    "local_positions", "previous_tokens", "ring_attention", "sequence_parallel_scan", "sequence_parallel_ssd",
    "shard_sequence",
]

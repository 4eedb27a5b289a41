"""A user's script, run by test_exit.py under torchrun: init the default gloo group, run every
sequence-parallel op forward and backward, save this rank's results, destroy the group, return.

    python -m torch.distributed.run --nproc_per_node 3 -m tests.distributed.exit_worker OUT_DIR

The ops: ring attention (both layouts, causal and not, GQA 6:3), distributed dilated attention
(segments within a shard and across 1-3 shards) and the sequence-parallel selective scan, SSD,
causal conv and ``previous_tokens`` (both layouts).  Lengths fit 3 processes.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed import test_dilated, test_ring, test_ssm

# (ring size, causal, layout, total length, heads, kv heads), as test_ring.CASES.
RING_CASES = [
    (None, True, "contiguous", 18, 6, 3),
    (None, False, "contiguous", 15, 6, 3),
    (None, True, "zigzag", 24, 6, 3),
    (None, False, "zigzag", 18, 6, 3),
]
# (total, heads, kv heads, segments, rates, causal, alibi), as test_dilated.CASES; local length 12.
DILATED_CASES = [
    (36, 6, 3, [6, 12, 24, 36], [1, 2, 4, 6], True, False),
    (36, 6, 3, [4, 12, 36], [1, 3, 5], False, False),
]
SSM_LENGTH = 48  # 6 zigzag chunks of 8 over 3 ranks


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {
        "ring": test_ring.run_cases(rank, world, RING_CASES),
        "dilated": test_dilated.run_cases(rank, world, DILATED_CASES),
        "ssm": test_ssm.run_cases(rank, world, SSM_LENGTH),
    }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

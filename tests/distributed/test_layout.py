"""Sequence layouts: shard then gather is the identity; positions."""

import pytest
import torch

from longctx.distributed.layout import gather_sequence, local_positions, shard_sequence
from tests.distributed.harness import run_ranks


def test_local_positions():
    assert local_positions(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]
    assert local_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert local_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible by 4"):
        local_positions(6, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        local_positions(8, 0, 2, "diagonal")


def _shard_gather(rank, world, layout):
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    local = shard_sequence(x, layout=layout)
    return local, gather_sequence(local, layout=layout)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_then_gather_is_identity(layout):
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    for rank, (local, full) in enumerate(run_ranks(_shard_gather, 2, layout)):
        assert torch.equal(full, x)
        assert torch.equal(local, x[:, local_positions(16, rank, 2, layout)])

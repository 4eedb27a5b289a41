"""Sequence-parallel training: the process group, sharding, and what ranks must agree on.

Launched under ``torchrun --nproc_per_node P`` with ``train.sequence_parallel = P`` (CLI
``--sequence-parallel P``): every rank builds the same model and draws the same batch,
keeps its shard of each sequence (``train.sequence_layout``), and gradients are summed
over the ranks, so every rank takes the same optimizer step.  Rank 0 alone writes files;
checkpoints are the single-process format and load either way.

A rank that fails mid-run leaves the others in a collective: gloo reports the broken
connection or the ``train.dist_timeout`` expires, and the surviving ranks raise an error
that names the failed rank and its error (recorded in the process group's store).
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from longctx.distributed.layout import num_chunks, shard_sequence
from longctx.distributed.parallelize import all_reduce_gradients, apply_sequence_parallel
from longctx.model import ConfigError


_FAILED = "longctx/failed"  # store key prefix: the error of a rank that stopped


class SequenceParallel:
    """This process's place in a sequence-parallel run."""

    def __init__(self, world: int, layout: str, timeout: float) -> None:
        self.layout, self.timeout = layout, timeout
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != world:
            raise ConfigError(
                f"train.sequence_parallel = {world} but {self.world} processes were launched; "
                f"run torchrun --nproc_per_node {world}"
            )

    def check_length(self, seq_len: int) -> None:
        chunks = num_chunks(self.world, self.layout)
        if seq_len % chunks:
            raise ConfigError(f"train.seq_len ({seq_len}) must be divisible by {chunks} to split it "
                              f"({self.layout} layout over {self.world} processes)")

    def parallelize(self, model):
        return apply_sequence_parallel(model, None, self.layout)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, layout=self.layout)

    def all_reduce_gradients(self, model) -> None:
        all_reduce_gradients(model)

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        dist.barrier()

    @contextlib.contextmanager
    def failures_named(self):
        """Make a failure on one rank an error on every rank that names it.

        A rank that raises records its error in the process group's key-value store before
        leaving.  The others then see their collective break (gloo: connection closed) or
        time out; they look the failed ranks up in the store and raise an error naming
        them.  A rank killed outright leaves no record: the error then says so."""
        store = dist.distributed_c10d._get_default_store()  # torchrun's / init_method's store
        try:
            yield
        except Exception as exc:
            failed = self._failed_ranks(store, wait=0.0)
            if not failed and isinstance(exc, (RuntimeError, dist.DistBackendError)):
                failed = self._failed_ranks(store, wait=5.0)  # give a crashing peer time to report
            if not failed:  # this rank's own error
                store.set(f"{_FAILED}/{self.rank}", f"{type(exc).__name__}: {exc}")
                raise
            names = "; ".join(f"rank {r}: {msg}" for r, msg in failed.items())
            raise RuntimeError(f"rank {self.rank}: sequence-parallel training stopped because another process "
                               f"failed ({names})") from exc

    def _failed_ranks(self, store, wait: float) -> dict[int, str]:
        keys = {r: f"{_FAILED}/{r}" for r in range(self.world) if r != self.rank}
        deadline = time.monotonic() + wait
        while True:
            found = {r: store.get(k).decode() for r, k in keys.items() if store.check([k])}
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def sequence_parallel_from(tc) -> SequenceParallel | None:
    """The run's SequenceParallel, or None for a single-process run; refuses a launch whose
    process count does not match the config."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if tc.sequence_parallel == 1:
        if launched > 1:
            raise ConfigError(f"{launched} processes were launched but train.sequence_parallel = 1; "
                              f"pass --sequence-parallel {launched}")
        return None
    if launched != tc.sequence_parallel and not dist.is_initialized():
        raise ConfigError(f"train.sequence_parallel = {tc.sequence_parallel} needs that many processes: "
                          f"torchrun --nproc_per_node {tc.sequence_parallel} -m longctx train ...")
    return SequenceParallel(tc.sequence_parallel, tc.sequence_layout, tc.dist_timeout)

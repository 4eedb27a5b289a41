"""Run a function on N spawned processes joined in a gloo group; collect what each returns.

    results = run_ranks(fn, 2, arg1, arg2)   # fn(rank, world, arg1, arg2) in each process

``fn`` must be importable (a module-level function of a test module).  Results travel back
through torch.save files in a temporary directory.  A rank that raises or dies makes the
call raise with that rank's traceback; a run longer than ``timeout`` seconds is killed.
"""

from __future__ import annotations

import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank: int, world: int, tmp: str, fn, args) -> None:
    torch.set_num_threads(1)  # N processes share this machine's cores
    path = Path(tmp)
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        # Every rank finishes connecting before any may run, fail fast and close its
        # sockets (which would break a peer still inside init_process_group).
        dist.barrier()
        result = fn(rank, world, *args)
        torch.save(result, path / f"result{rank}.pt")
    except BaseException:
        (path / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 180.0) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_child, args=(r, world, tmp, fn, args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = sorted(Path(tmp).glob("error*.txt"))
        if errors:
            raise RuntimeError("\n".join(f"{e.stem}:\n{e.read_text()}" for e in errors))
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks {bad} did not finish (exit codes {[procs[r].exitcode for r in bad]}, "
                               f"timeout {timeout} s)")
        return [torch.load(Path(tmp) / f"result{r}.pt", weights_only=False) for r in range(world)]

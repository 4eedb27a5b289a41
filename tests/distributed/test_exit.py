"""Three processes (the other tests use 2 and 4) under torchrun, as a user runs them: every
process of every run exits 0 after destroy_process_group, and the results equal one process's.

A process that dies at exit (a transfer still pending, a thread not joined) fails torchrun
with its signal, so each run's return code covers all of its processes.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx.cli.main import main
from tests.distributed import test_dilated, test_ring, test_ssm
from tests.distributed.exit_worker import DILATED_CASES, RING_CASES, SSM_LENGTH
from tests.distributed.test_training import run_losses, train_args

ROOT = Path(__file__).resolve().parents[2]
WORLD = 3
RUNS = 5  # exit failures are timing-dependent: one run proves little


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 3 ARGS`` from the repository root, on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_process_exits_cleanly_and_results_match_one_process(tmp_path):
    """Ring attention, dilated attention and the scans (exit_worker), forward and backward, in
    RUNS launches; the first launch's values and gradients against one process."""
    failed = []
    for run in range(RUNS):
        out = tmp_path / str(run)
        out.mkdir()
        result = torchrun("-m", "tests.distributed.exit_worker", str(out))
        if result.returncode != 0:
            failed.append(f"run {run}: return code {result.returncode}\n{result.stderr[-3000:]}")
    assert not failed, f"{len(failed)} of {RUNS} runs failed:\n" + "\n".join(failed)

    per_rank = [torch.load(tmp_path / "0" / f"rank{r}.pt") for r in range(WORLD)]
    for case in RING_CASES:
        test_ring.check_case(per_rank[0]["ring"][case], case)
    test_dilated.check_cases([results["dilated"] for results in per_rank], DILATED_CASES)
    for layout in ("contiguous", "zigzag"):
        test_ssm.check([results["ssm"][layout] for results in per_rank], WORLD, layout, SSM_LENGTH, test_ssm.ALL)


def test_training_on_three_processes_exits_cleanly_and_follows_one_process(tmp_path, tiny_corpus):
    """``torchrun --nproc_per_node 3 -m longctx train --sequence-parallel 3``: every process exits 0
    and the losses are those of one process (66 tokens: 22 per rank)."""
    length = ("--set", "train.seq_len=66")
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(train_args(one, tiny_corpus, *length)) == 0
    result = torchrun("-m", "longctx", *train_args(three, tiny_corpus, *length), "--sequence-parallel", str(WORLD))
    assert result.returncode == 0, result.stderr[-3000:]
    for (s1, l1, v1), (s3, l3, v3) in zip(run_losses(one), run_losses(three), strict=True):
        assert s1 == s3
        for a, b in ((l1, l3), (v1, v3)):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-4))

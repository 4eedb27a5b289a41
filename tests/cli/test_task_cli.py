"""``longctx task train|eval`` and ``longctx compare`` end to end on tiny models."""

import json

from longctx.cli.main import main

TINY = ["--train-len", "24", "--steps", "3", "--set", "model.d_model=16", "--set", "model.n_heads=2",
        "--set", "task.batch_size=2", "--set", "task.eval_every=100", "--set", "task.val_examples=2",
        "--set", "task.start_len=0"]


def test_train_then_eval_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["task", "train", "--task", "induction", "--arch", "mamba", "--out", str(run), "--quiet", *TINY]) == 0
    assert "induction / mamba: step 3/3" in capsys.readouterr().out
    assert main(["task", "eval", str(run), "--lengths", "24,48,...,96", "--examples", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "induction" and list(result["accuracy"]) == ["24", "48", "96"]
    assert main(["task", "eval", str(run), "--lengths", "24", "--examples", "2"]) == 0
    assert "| mamba | " in capsys.readouterr().out


def test_compare_writes_the_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "induction", "--archs", "attention,mamba:lr=0.002", "--out", str(out),
                 "--quiet", "--lengths", "24,48", "--examples", "4", "--eval-minutes", "5", *TINY]) == 0
    text = (out / "report.md").read_text()
    assert "| attention |" in text and "| mamba:lr=0.002 |" in text and "training time" in text
    assert "| 0.003 |" in text and "| 0.002 |" in text  # each architecture's peak learning rate
    assert (out / "accuracy.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == ["attention", "mamba:lr=0.002"]
    assert set(results["runs"][1]["accuracy"]) == {"24", "48"}
    assert (out / "attention" / "summary.json").is_file() and (out / "mamba_lr-0.002" / "checkpoints").is_dir()
    assert json.loads((out / "mamba_lr-0.002" / "config.json").read_text())["task"]["lr"] == 0.002
    assert "report:" in capsys.readouterr().out


def test_bad_input_gets_clear_errors(tmp_path, capsys):
    assert main(["task", "train", "--task", "sorting", "--arch", "mamba", "--out", str(tmp_path / "a")]) == 2
    assert "choose one of selective_copying, induction, mqar, passkey" in capsys.readouterr().err
    assert main(["compare", "--task", "induction", "--presets", "mamba,rnn", "--out", str(tmp_path / "b")]) == 2
    assert "unknown architecture 'rnn'; choose one of attention, longnet, mamba, mamba2, hybrid" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["task", "train", "--task", "mqar", "--arch", "attention", "--out", str(run), "--quiet",
                 "--set", "task.pairs=4", "--set", "task.vocab=16", *TINY]) == 0
    capsys.readouterr()
    assert main(["task", "eval", str(run), "--lengths", "8,16"]) == 2
    assert "cannot produce length(s) 8: the shortest example has 12 tokens" in capsys.readouterr().err
    assert main(["task", "eval", str(run), "--task", "induction", "--lengths", "64"]) == 2
    assert "is a run of task 'mqar', not 'induction'" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "a"]) == 2
    assert "synthetic-task run" in capsys.readouterr().err
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model": {}, "data": {}, "train": {}, "sample": {}}))
    assert main(["task", "eval", str(lm)]) == 2
    assert "language-model run" in capsys.readouterr().err

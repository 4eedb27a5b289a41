"""End to end through the command line on a tiny corpus: train, stop, resume, generate, eval."""

import json
import re
import subprocess
import sys

import pytest

from longctx.cli.main import main

TINY = [
    "--set", "model.d_model=32", "--set", "model.n_heads=2", "--set", "model.layers=['attention','attention']",
    "--set", "train.steps=8", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
    "--set", "train.warmup_steps=2", "--set", "train.eval_every=4", "--set", "train.eval_batches=2",
    "--set", "train.save_every=3", "--set", "train.log_every=1", "--set", "sample.max_new_tokens=20",
]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _values(records):
    """Everything but wall-clock measurements."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_train_stop_resume_equals_uninterrupted(tmp_path, tiny_corpus, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(full), "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    assert "unigram byte model" in out and "sample:" in out
    assert (full / "loss.png").is_file()

    assert main(["train", "--data", str(tiny_corpus), "--out", str(split), "--quiet", "--stop-at", "5", *TINY]) == 0
    assert _metrics(split)[-1]["step"] == 5
    assert main(["train", "--out", str(split), "--resume", "--quiet"]) == 0
    assert _values(_metrics(split)) == _values(_metrics(full))


def test_generate_eval_info(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "16", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ")
    assert main(["eval", str(run), "--data", str(tiny_corpus / "mod0.py"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and result["bpb"] > 0
    assert main(["eval", str(run), "--data", str(tiny_corpus / "mod0.py"), "--seq-len", "16", "--by-position"]) == 0
    text = capsys.readouterr().out
    assert "     1-1 " in text and "     8-15 " in text and "    16-16 " in text
    assert (run / "loss_by_position.png").is_file()
    assert main(["eval", str(run), "--data", str(tiny_corpus / "mod0.py"), "--by-position", "--json",
                 "--plot", str(tmp_path / "p.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["by_position"]) == 32 and (tmp_path / "p.png").is_file()
    assert sum(result["by_position"]) / 32 == pytest.approx(result["loss"], rel=1e-6)
    assert main(["info", str(run)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latest_checkpoint"] == "step_000008" and info["summary"]["step"] == 8


def test_console_script_runs_as_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "longctx", "train", "--preset", "nope", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown preset 'nope'" in result.stderr


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--data", "/no/such/path", "--out", "{tmp}/r"], "does not exist"),
        (["train", "--data", "{tmp}/empty", "--out", "{tmp}/r"], "no files|empty"),
        (["train", "--set", "train.bogus=1", "--out", "{tmp}/r"], "unknown train config key"),
        (["train", "--set", "train.lr=0", "--out", "{tmp}/r"], "train.lr must be positive"),
        (["generate", "{tmp}/missing"], "does not exist"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, args, match, capsys):
    (tmp_path / "empty").mkdir()
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.fixture
def trained(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *TINY]) == 0
    capsys.readouterr()
    return run


def test_existing_run_is_not_overwritten(trained, tiny_corpus, capsys):
    before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert main(["train", "--data", str(tiny_corpus), "--out", str(trained), "--quiet", *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == before


def test_resume_with_a_different_model_is_refused(trained, capsys):
    assert main(["train", "--out", str(trained), "--resume", "--set", "model.d_model=64"]) == 2
    assert "[model] differ from the settings" in capsys.readouterr().err


def test_truncated_weights_and_mismatched_config(trained, capsys):
    weights = trained / "checkpoints" / "step_000008" / "model.safetensors"
    config = json.loads((trained / "config.json").read_text())
    config["model"]["d_model"] = 48
    (trained / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(trained), "--max-new-tokens", "2"]) == 2
    assert "does not match the model config" in capsys.readouterr().err
    config["model"]["d_model"] = 32
    (trained / "config.json").write_text(json.dumps(config))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert main(["generate", str(trained), "--max-new-tokens", "2"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    # The other checkpoint is untouched and still loads.
    assert main(["generate", str(trained), "--max-new-tokens", "2", "--checkpoint", "step_000006"]) == 0


def test_prompt_too_long_for_absolute_positions(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "run"
    args = [*TINY, "--set", "model.pos='learned'", "--set", "model.max_seq_len=32"]
    assert main(["train", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *args]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "x" * 30, "--max-new-tokens", "5"]) == 2
    assert "limit of 32 positions" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_corpus):
    import os
    import signal
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "longctx", "train", "--data", str(tiny_corpus), "--out", str(run), "--quiet",
            *TINY, "--set", "train.steps=100000", "--set", "train.save_every=100000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and _metrics(run)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out
    step = int(out.split("interrupted at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step_{step:06d}").is_dir()
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--set", f"train.steps={step + 2}"]) == 0
    steps = [r["step"] for r in _metrics(run) if "loss" in r]
    assert steps == list(range(1, step + 3))


def test_resume_with_other_data_or_seed_is_refused(trained, tiny_corpus, capsys):
    assert main(["train", "--out", str(trained), "--resume", "--set", "train.seed=7"]) == 2
    assert "train.seed differ" in capsys.readouterr().err
    assert main(["train", "--out", str(trained), "--resume", "--data", str(tiny_corpus / "mod1.py")]) == 2
    assert "[data] differ" in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_checkpoint_can_start_again(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *TINY,
                 "--set", "train.lr=1e9", "--set", "train.warmup_steps=0"]) == 2
    assert "lower train.lr" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *TINY]) == 0


def test_bpe_tokenizer_run_trains_and_generates(tmp_path, tiny_corpus, capsys):
    pytest.importorskip("tokenizers")
    run = tmp_path / "run"
    args = [*TINY, "--set", "data.tokenizer='bpe'", "--set", "data.bpe_vocab_size=320", "--set", "train.steps=2"]
    assert main(["train", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *args]) == 0
    assert (run / "tokenizer.json").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] >= 320
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def f", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f")

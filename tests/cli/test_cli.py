"""End to end through the command line on a tiny corpus: train, stop, resume, generate, eval."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

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


def _resume(run, capsys, *extra):
    """Resume ``run`` in this process; return its records from before and after, and its output."""
    before = _metrics(run)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--quiet", *extra]) == 0
    return before, _metrics(run), capsys.readouterr().out


def test_train_stop_resume_equals_uninterrupted(tmp_path, tiny_corpus, capsys):
    """A run stopped at step 5 and resumed writes the uninterrupted run's metrics, and the
    resumed process starts from the checkpoint: it runs steps 6-8 only, from its weights."""
    full, split, edited = tmp_path / "full", tmp_path / "split", tmp_path / "edited"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(full), "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    assert "unigram byte model" in out and "sample:" in out
    assert (full / "loss.png").is_file()

    assert main(["train", "--data", str(tiny_corpus), "--out", str(split), "--quiet", "--stop-at", "5", *TINY]) == 0
    assert _metrics(split)[-1]["step"] == 5
    shutil.copytree(split, edited)
    before, after, out = _resume(split, capsys)
    assert f"resumed from {split / 'checkpoints' / 'step_000005'} at step 5" in out
    # Steps 1-5 were not run again: their records, wall-clock tokens_per_s included, are the first process's.
    assert after[: len(before)] == before
    assert _values(after) == _values(_metrics(full))

    # Resumed from other weights (step 3's under step 5's name), the run takes another course.
    ckpts = edited / "checkpoints"
    shutil.copy(ckpts / "step_000003" / "model.safetensors", ckpts / "step_000005" / "model.safetensors")
    _, after, _ = _resume(edited, capsys, "--stop-at", "6")
    step6 = [next(r["loss"] for r in records if r["step"] == 6) for records in (after, _metrics(full))]
    assert step6[0] != step6[1]


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
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latest_checkpoint"] == "step_000008" and info["summary"]["step"] == 8
    assert main(["info", str(run)]) == 0
    text = capsys.readouterr().out
    best = min((r["val_bpb"], r["step"]) for r in _metrics(run) if "val_bpb" in r)
    assert "architecture: 2 attention layers of d_model 32" in text and "mamba" not in text
    assert f"trained: 8 of 8 steps; best validation {best[0]:.3f} bits/byte at step {best[1]}" in text
    assert "tokenizer: byte, 264 tokens" in text and "(latest step_000008)" in text


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
        (["train", "--data", "{tmp}/image.png", "--out", "{tmp}/r"], "image.png' is not a text file"),
        (["train", "--set", "train.lr=fast", "--out", "{tmp}/r"], "train.lr must be a number; got 'fast'"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, args, match, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_corpus, capsys, sig):
    """Ctrl-C or SIGTERM mid-run: exit 130 with a checkpoint of the last step; a resume runs
    from there, not from step 0."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "longctx", "train", "--data", str(tiny_corpus), "--out", str(run), "--quiet",
            *TINY, "--set", "train.steps=100000", "--set", "train.save_every=100000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and _metrics(run)):
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out
    step = int(out.split("interrupted at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step_{step:06d}").is_dir()
    # The interrupted run keeps its curve and summary so far.
    assert (run / "loss.png").is_file() and json.loads((run / "summary.json").read_text())["step"] == step
    before, after, _ = _resume(run, capsys, "--set", f"train.steps={step + 2}")
    assert [r["step"] for r in after if "loss" in r] == list(range(1, step + 3))
    assert after[: len(before)] == before  # the resumed process ran only steps step+1 and step+2


class _CtrlCAfter(io.StringIO):
    """A stdout that presses Ctrl-C (raises SIGINT) once ``limit`` characters were written."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def write(self, text):
        written = super().write(text)
        if self.tell() >= self.limit:
            signal.raise_signal(signal.SIGINT)
        return written


def test_generate_with_no_token_limit_runs_until_ctrl_c(trained, capsys):
    """--max-new-tokens -1 goes on past the default 200 tokens (the greedy text has no eos)
    until Ctrl-C, which ends it with exit code 130."""
    out = _CtrlCAfter(len("def ") + 250)  # Ctrl-C at the 250th character generated
    with contextlib.redirect_stdout(out):
        code = main(["generate", str(trained), "--prompt", "def ", "--max-new-tokens", "-1", "--temperature", "0"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert out.getvalue().startswith("def ") and len(out.getvalue()) == len("def ") + 250


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


@pytest.mark.parametrize("option,match", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "2"], r"top_p must be in \(0, 1\]"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 0, or -1 for no limit"),
])
def test_bad_generation_options_are_refused_before_any_output(tmp_path, capsys, option, match):
    """Checked before the run is even looked at: the run here does not exist."""
    assert main(["generate", str(tmp_path / "run"), "--prompt", "def ", *option]) == 2
    out, err = capsys.readouterr()
    assert out == "" and re.search(match, err)


def test_help_and_argument_errors_load_no_heavy_module():
    """--help and argument errors answer at once: building the parser (for any command but
    the task ones) imports neither torch nor numba, transformers or matplotlib."""
    code = ("import sys; from longctx.cli.main import build_parser; build_parser(['generate']); "
            "print(sorted(m for m in ('torch', 'numba', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_generate_with_lookup_drafts_prints_the_same_greedy_text(trained, capsys):
    prompt = "def f(x):\n    return x\n\n\ndef f(x):\n"
    outputs = []
    for extra in ([], ["--draft", "lookup"], ["--draft", "lookup", "--draft-tokens", "3"]):
        assert main(["generate", str(trained), "--prompt", prompt, "--max-new-tokens", "40", "--temperature", "0",
                     *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    assert main(["generate", str(trained), "--prompt", "x", "--draft", "lookup", "--cache", "sinks"]) == 2
    assert "use --cache dense, or no --draft" in capsys.readouterr().err

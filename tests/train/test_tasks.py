"""Task runs: configuration and its errors, training reduces the loss, resume equals an
uninterrupted run, the time budget stops and saves, run directories of another kind refused."""

import json

import pytest
import torch

from longctx.model.config import ConfigError
from longctx.train.checkpoint import latest_checkpoint, load_model_weights
from longctx.train.tasks import (
    ARCHS,
    TASK_NAMES,
    TaskConfig,
    apply_overrides,
    load_task_run,
    parse_arch,
    read_task_config,
    train_task,
)

TINY = {"model": {"d_model": 16, "n_heads": 2}, "train_len": 32, "batch_size": 4, "eval_every": 100,
        "val_examples": 4, "log_every": 1, "save_every": 2, "warmup": 1}


def tiny(task="induction", arch="attention", **kw):
    values = {**TINY, "task": task, "arch": arch, **kw}
    return TaskConfig.from_dict(values)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _timeless(records):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_seconds")} for r in records]


def test_defaults_come_from_the_task():
    cfg = TaskConfig(task="induction", arch="mamba")
    assert (cfg.train_len, cfg.options["vocab"]) == (256, 16)
    m = cfg.model_config()
    assert m.layers == ["mamba", "mamba"] and m.d_model == 64 and m.mlp_hidden == 0 and m.vocab_size == 16
    assert TaskConfig(task="passkey", arch="attention").model_config().vocab_size == 256
    assert TaskConfig(task="mqar", arch="attention", options={"vocab": 64}).model_config().vocab_size == 64


def test_archs_map_to_layer_lists():
    layers = {p: TaskConfig(task="induction", arch=p).model_config() for p in ARCHS}
    assert layers["attention"].layers == ["attention"] * 2 and layers["attention"].pos == "rope"
    assert layers["longnet"].layers == ["dilated"] * 2
    assert max(layers["longnet"].dilated_segments) >= 2**20  # the patterns reach the longest evaluation
    assert layers["mamba2"].layers == ["mamba2"] * 2
    assert layers["hybrid"].layers == ["mamba", "attention"]
    assert layers["mamba"].ssm_selective and not layers["s4d"].ssm_selective
    assert layers["s4d"].layers == layers["mamba"].layers


def test_bad_configs_name_the_valid_choices():
    with pytest.raises(ConfigError, match="unknown task 'copy'.*induction.*mqar.*passkey"):
        TaskConfig(task="copy")
    with pytest.raises(ConfigError, match="unknown architecture 'rnn'.*attention, longnet, mamba, mamba2, hybrid"):
        TaskConfig(task="induction", arch="rnn")
    with pytest.raises(ConfigError, match="unknown option.*pairs.*valid: vocab"):
        TaskConfig(task="induction", options={"pairs": 3})
    with pytest.raises(ConfigError, match="needs train_len >= 48"):
        TaskConfig(task="mqar", train_len=40, options={"pairs": 16})
    with pytest.raises(Exception, match="even vocab"):
        TaskConfig(task="mqar", options={"vocab": 63})
    with pytest.raises(ConfigError, match="unknown model config key"):
        TaskConfig(task="induction", model={"width": 3})
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        TaskConfig(task="induction", steps=0)
    assert set(TASK_NAMES) == {"selective_copying", "induction", "mqar", "passkey", "addition"}


def test_overrides_and_arch_specs():
    values = apply_overrides({"task": "mqar", "arch": "mamba"},
                             ["task.pairs=4", "task.lr=0.01", "model.ssm_state=4"])
    cfg = TaskConfig.from_dict(values)
    assert cfg.options["pairs"] == 4 and cfg.lr == 0.01 and cfg.model_config().ssm_state == 4
    assert parse_arch("mamba:ssm_state=64:d_model=32") == ("mamba", {"ssm_state": 64, "d_model": 32}, {})
    assert parse_arch("mamba2:lr=0.003:ssm_state=16:steps=10") == ("mamba2", {"ssm_state": 16},
                                                                      {"lr": 0.003, "steps": 10})
    with pytest.raises(ConfigError, match="unknown architecture"):
        parse_arch("s4")
    with pytest.raises(ConfigError, match="sections are"):
        apply_overrides({}, ["train.lr=1"])


def test_a_few_steps_reduce_the_loss(tmp_path):
    # vocab 4: two data tokens; the first thing learnt is never to answer noise or the marker.
    cfg = tiny("selective_copying", options={"n_tokens": 4, "vocab": 4}, steps=25, lr=1e-2, train_len=24)
    result = train_task(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    losses = [r["loss"] for r in _records(tmp_path / "run") if "loss" in r]
    assert result.step == 25 and not result.interrupted
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["parameters"] == result.parameters
    assert (tmp_path / "run" / "training.png").is_file()


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny("induction", "mamba", steps=6)
    full, split = tmp_path / "full", tmp_path / "split"
    train_task(cfg, full, progress=False, log=lambda m: None)
    first = train_task(cfg, split, stop_at=3, progress=False, log=lambda m: None)
    assert first.step == 3 and not first.interrupted
    second = train_task(cfg, split, resume=True, progress=False, log=lambda m: None)
    assert second.step == 6
    assert _timeless(_records(split)) == _timeless(_records(full))
    _, a, _ = load_task_run(full)
    _, b, _ = load_task_run(split)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_state_passing_carries_the_state_and_resumes_exactly(tmp_path):
    """With task.state_passing each step starts from the last step's final state: the first
    step equals a run without it and later ones differ; the carried state is checkpointed, so
    a resumed run equals an uninterrupted one (which fails if the carry is not restored)."""
    cfg = tiny("induction", "mamba", steps=6, state_passing=True)
    full, split, plain = tmp_path / "full", tmp_path / "split", tmp_path / "plain"
    train_task(cfg, full, progress=False, log=lambda m: None)
    train_task(cfg, split, stop_at=3, progress=False, log=lambda m: None)
    train_task(cfg, split, resume=True, progress=False, log=lambda m: None)
    assert _timeless(_records(split)) == _timeless(_records(full))
    _, a, _ = load_task_run(full)
    _, b, _ = load_task_run(split)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    train_task(tiny("induction", "mamba", steps=6, state_passing=False), plain, progress=False, log=lambda m: None)
    carried = [r["loss"] for r in _records(full) if "loss" in r]
    fresh = [r["loss"] for r in _records(plain) if "loss" in r]
    assert carried[0] == fresh[0] and carried[1:] != fresh[1:]  # untrained, the carried state moves losses ~1e-6


def test_state_passing_and_weight_decay_default_per_task():
    """Induction heads: no weight decay, and state passing where every layer is recurrent
    (what lets a Mamba trained at 256 hold at 2^16); other tasks: weight decay 0.1, no state
    passing; explicit values win."""
    for arch in ("mamba", "mamba2", "s4d"):
        assert TaskConfig(task="induction", arch=arch).state_passing is True
    for arch in ("attention", "hybrid", "longnet"):
        assert TaskConfig(task="induction", arch=arch).state_passing is False
    assert TaskConfig(task="mqar", arch="mamba").state_passing is False
    assert TaskConfig(task="induction", arch="mamba", state_passing=False).state_passing is False
    assert TaskConfig(task="induction", arch="attention").weight_decay == 0.0
    assert TaskConfig(task="mqar", arch="mamba").weight_decay == 0.1
    assert TaskConfig(task="induction", arch="mamba", weight_decay=0.05).weight_decay == 0.05
    saved = TaskConfig(task="induction", arch="mamba").to_dict()  # resolved values are saved
    assert (saved["state_passing"], saved["weight_decay"]) == (True, 0.0)
    with pytest.raises(ConfigError, match="task.weight_decay must be a number >= 0"):
        TaskConfig(task="induction", arch="mamba", weight_decay="none")


def test_validation_at_further_lengths(tmp_path):
    """task.val_lengths: every validation also scores those lengths, logged per step and
    plotted; lengths the task cannot produce are refused before training."""
    cfg = TaskConfig.from_dict({**TINY, "task": "induction", "arch": "mamba", "steps": 4, "eval_every": 2,
                                "val_lengths": [128, 64]})
    train_task(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    vals = [r for r in _records(tmp_path / "run") if "val_accuracy" in r]
    assert [r["step"] for r in vals] == [2, 4]
    for r in vals:
        assert set(r["val_accuracy_at"]) == {"64", "128"}
        assert all(0.0 <= a <= 1.0 for a in r["val_accuracy_at"].values())
    assert (tmp_path / "run" / "training.png").is_file()
    train_task(tiny("induction", steps=2, eval_every=2), tmp_path / "plain", progress=False, log=lambda m: None)
    assert [set(r) for r in _records(tmp_path / "plain") if "val_accuracy" in r] == [{"step", "val_accuracy"}]
    with pytest.raises(ConfigError, match="cannot produce length"):
        tiny("induction", val_lengths=[2])
    with pytest.raises(ConfigError, match="val_lengths must be a list"):
        tiny("induction", val_lengths=4096)


def test_state_passing_needs_recurrent_layers():
    for arch in ("attention", "hybrid", "longnet"):
        with pytest.raises(ConfigError, match="state_passing needs a model whose layers are all recurrent"):
            tiny("induction", arch, state_passing=True)
    assert tiny("induction", "mamba2", state_passing=True).state_passing


def test_budget_stops_and_saves(tmp_path):
    cfg = tiny("induction", steps=1000)
    result = train_task(cfg, tmp_path / "run", budget_minutes=1e-6, progress=False, log=lambda m: None)
    assert result.out_of_budget and 1 <= result.step < 1000
    assert latest_checkpoint(tmp_path / "run").name == f"step_{result.step:06d}"
    resumed = train_task(cfg, tmp_path / "run", resume=True, budget_minutes=1e-6, progress=False, log=lambda m: None)
    assert resumed.step > result.step


def test_resume_refuses_other_settings_and_other_runs(tmp_path):
    run = tmp_path / "run"
    train_task(tiny(steps=2), run, progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="already holds a run"):
        train_task(tiny(steps=2), run, progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="task.arch"):
        train_task(tiny(arch="mamba", steps=2), run, resume=True, progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="is a run of task 'induction', not 'mqar'"):
        read_task_config(run, task="mqar")
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model": {}, "data": {}, "train": {}, "sample": {}}))
    with pytest.raises(ConfigError, match="language-model run.*longctx eval"):
        read_task_config(lm)
    with pytest.raises(ConfigError, match="language-model run"):
        train_task(tiny(steps=2), lm, progress=False, log=lambda m: None)


def test_loaded_weights_match_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    train_task(tiny(steps=2), run, progress=False, log=lambda m: None)
    cfg, model, path = load_task_run(run)
    assert cfg.task == "induction" and not model.training
    copy = type(model)(model.config)
    load_model_weights(copy, path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values()))


def test_length_curriculum_keeps_tokens_per_step():
    from longctx.train.tasks.trainer import tokens_seen, train_batch_size, train_length

    cfg = TaskConfig(task="induction", arch="mamba")  # the task's default curriculum: 16 -> 256
    assert [train_length(cfg, s) for s in (0, 74, 75, 150, 225, 300, 10_000)] == [16, 16, 32, 64, 128, 256, 256]
    assert {train_batch_size(cfg, s) * train_length(cfg, s) for s in range(0, 800, 25)} == {16 * 256}
    assert tokens_seen(cfg, 10) == 10 * 16 * 256
    off = TaskConfig(task="induction", arch="mamba", start_len=0)
    assert off.start_len is None and train_length(off, 0) == 256
    assert TaskConfig(task="mqar", arch="mamba", start_len=8).start_len == 24  # raised to 3 * pairs

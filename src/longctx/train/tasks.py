"""Train small models on the synthetic long-context tasks, evaluate them, compare architectures.

A task run directory (``longctx task train --out RUN``)::

    RUN/config.json        {"kind": "task", "task": TaskConfig, "model": ModelConfig}
    RUN/checkpoints/...    atomic checkpoints (longctx.train.checkpoint), resumable
    RUN/metrics.jsonl      loss, accuracy on the asked positions, lr, tokens/s per log step;
                           validation accuracy at the training length every ``eval_every`` steps
    RUN/summary.json       steps done, training wall time, parameters, tokens/s, final accuracy
    RUN/training.png       loss and accuracy against step

Every step draws a fresh batch from the task's generator seeded by ``(seed, step)``
(``longctx.data.synthetic``), so an interrupted run resumes exactly: weights, optimizer and
RNG come from the checkpoint and the data position is the step itself.  The loss is the
cross-entropy on the asked positions only (targets != ``IGNORE``).

Presets name an architecture family; the model size and training setup come from the task
(its paper's, scaled to train in about 15 minutes on 2 CPU cores), see ``TASK_DEFAULTS``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longctx.data.synthetic import IGNORE, TASKS, make_batch
from longctx.eval.report import plot_task_training, write_report
from longctx.eval.tasks import (
    EVAL_SEED_BASE,
    chance_level,
    check_lengths,
    evaluate_task,
    task_min_length,
    task_options,
)
from longctx.model import LanguageModel
from longctx.model.config import ConfigError, ModelConfig
from longctx.ops.dilated import dilated_patterns
from longctx.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_extra_tensors,
    load_model_weights,
    read_run_config,
    save_checkpoint,
    write_json_atomic,
)
from longctx.train.config import TrainConfig
from longctx.train.loop import _stop_on_signal
from longctx.train.metrics import MetricsLog, read_metrics
from longctx.train.optim import lr_at, make_optimizer

RUN_KIND = "task"
# The architecture families, and (last) "s4d": the mamba preset made time-invariant
# (model.ssm_selective = false), the Mamba paper's baseline for selective copying.
FAMILIES = ("attention", "longnet", "mamba", "mamba2", "hybrid")
PRESETS = FAMILIES + ("s4d",)
RECURRENT_LAYERS = ("mamba", "mamba2")  # mixers whose whole past is a fixed-size state (task.state_passing)
TASK_NAMES = tuple(TASKS)


@dataclass(frozen=True)
class TaskDefaults:
    """One task's setup: the paper's model shape, a CPU-sized training run, default
    evaluation lengths and what was changed from the paper (``note``)."""

    train_len: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    options: dict[str, Any]
    eval_lengths: tuple[int, ...]
    d_model: int = 64
    n_layers: int = 2
    start_len: int | None = None  # length curriculum start (TaskConfig.start_len)
    weight_decay: float = 0.1
    state_passing: bool = False  # TaskConfig.state_passing for presets whose layers are all recurrent
    note: str = ""


def _powers(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(2**k for k in range(lo, hi + 1))


# Model shape of the papers (2 layers, d_model 64); steps and batch sized for about 15 minutes
# of training on 2 shared CPU cores.  Measured for induction (3000 steps: mamba 4.5 min and
# attention 5.5 min on 1 core, another run on the other), selective copying (3000 steps: 12-13
# min on 1 core with two other runs beside it), MQAR (README, Benchmarks) and passkey (mamba:
# 100% at 256 after 3000 steps, 4.4 min on 2 cores; 68% after 1000).
TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "induction": TaskDefaults(
        train_len=256, steps=3000, batch_size=16, lr=3e-3, warmup=50, options={"vocab": 16}, start_len=16,
        eval_lengths=_powers(8, 20), weight_decay=0.0, state_passing=True,
        note="Mamba App. E.1: vocab 16, 2 layers, d_model 64, trained at 256, tested up to 2^20; the paper "
             "trains ~200k steps of batch 8 at length 256, here 3000 steps of 4096 tokens: lengths 16, 32, "
             "..., 256 (batch 256, 128, ..., 16) over the first 300 steps, then 256.  No weight decay, and "
             "state passing for recurrent models: with both, 2-layer Mambas (seeds 0, 1, 2) were 100, 61 "
             "and 67% accurate at 2^16 (97-100% at 2^14); without state passing 18%, with weight decay 0.1 "
             "18%; step sizes initialised from 1e-5 instead of 1e-3 gave 100, 97, 13 and 64% (seeds 0-3)",
    ),
    "selective_copying": TaskDefaults(
        train_len=512, steps=3000, batch_size=16, lr=3e-3, warmup=50, options={"vocab": 16, "n_tokens": 16},
        start_len=32,
        eval_lengths=_powers(9, 16),
        note="Mamba App. E.1 uses length 4096; 512 here so that training fits about 15 minutes on 2 CPU cores "
             "(--train-len 4096 for the paper's setting).  3000 steps: mamba 90% accurate at 512, its "
             "time-invariant form (s4d) at chance; after 1000 steps 41% and chance",
    ),
    "mqar": TaskDefaults(
        train_len=128, steps=3000, batch_size=16, lr=1e-3, warmup=50, options={"vocab": 64, "pairs": 8},
        start_len=32,
        eval_lengths=_powers(7, 12),
        note="Zoology (Arora et al. 2023) uses vocab 8192 and (length, pairs) from (64, 4) to (512, 64) and tunes "
             "the learning rate per model; here vocab 64 and (128, 8), lengths 32 -> 128 over the first 150 steps "
             "(with vocab 256 and (256, 16) neither attention nor Mamba left chance level in 1000 steps, and an "
             "8192-way output layer dominates CPU time at d_model 64). Peak lr 1e-3 suits attention (at 3e-3 it "
             "stayed near 20%); the state-space presets learn at 3e-3 (mamba2:lr=0.003)",
    ),
    "passkey": TaskDefaults(
        train_len=256, steps=3000, batch_size=16, lr=3e-3, warmup=50, options={"digits": 5}, start_len=128,
        eval_lengths=_powers(8, 14),
        note="byte-level text (vocab 256), 5-digit keys, note at a random depth while training",
    ),
}

# Depths of the note while training passkey models: a fresh random depth per example batch.
_PASSKEY_TRAIN_DEPTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_task(task: str) -> str:
    _check(task in TASKS, f"unknown task {task!r}; choose one of {', '.join(TASK_NAMES)}")
    return task


def parse_preset(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``"mamba"`` -> ``("mamba", {}, {})``; ``"mamba:ssm_state=64:lr=0.003"`` -> the preset,
    its model overrides and its training overrides (keys that are ``TaskConfig`` training
    fields: ``lr``, ``steps``, ``warmup``, ...; values read as TOML: numbers, booleans,
    lists; else strings).  Architectures learn best at different settings (Zoology sweeps
    the learning rate per model), so a comparison can give each its own."""
    from longctx.train.config import parse_override

    name, *pairs = spec.strip().split(":")
    _check(name in PRESETS, f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} "
                            "(optionally with model or training overrides: mamba:ssm_state=64:lr=0.003)")
    model: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for pair in pairs:
        _check("=" in pair, f"preset {spec!r}: expected NAME:key=value[:key=value...]; got {pair!r}")
        ((key, value),) = parse_override(f"model.{pair}")["model"].items()
        (training if key in TRAINING_FIELDS else model)[key] = value
    return name, model, training


@dataclass
class TaskConfig:
    """A task run: which task and architecture, the training setup, task options and model
    overrides.  ``None`` fields take the task's defaults (``TASK_DEFAULTS``) on construction,
    so a saved config holds resolved values."""

    task: str = "induction"
    preset: str = "mamba"
    train_len: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float | str = "default"  # "default": the task's (TASK_DEFAULTS)
    grad_clip: float = 1.0
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # task options over the defaults: vocab, pairs, ...
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides over the preset's
    # Length curriculum: training starts at start_len and doubles every grow_every steps up to
    # train_len (None: train_len from the first step), the batch growing as the length shrinks
    # (batch_size * train_len tokens per step throughout).  Short distances between the facts and
    # the question, and many more questions per step, give a 2-layer model its first gradient
    # signal hundreds of steps sooner (without it neither attention nor Mamba leaves chance level
    # within 500 steps of batch 16 at length 256 on induction heads).
    start_len: int | str | None = "default"  # "default": the task's (TASK_DEFAULTS); 0 or None: off
    grow_every: int = 75
    # Recurrent models only: each training sequence starts from the final state of the
    # sequence in the same batch row one step before (detached), not from zeros, so training
    # meets the states of long histories that evaluation far beyond train_len reaches (the
    # "state passing" of Buitrago Ruiz & Gu, "Understanding and Improving Length
    # Generalization in Recurrent Models", 2025).  Steps whose batch size differs from the
    # step before (the length curriculum) start from zeros.  "default": the task's
    # (TASK_DEFAULTS) where every layer is recurrent, else off.
    state_passing: bool | str = "default"
    eval_every: int = 100  # validation accuracy at train_len every this many steps
    # Further validation lengths, e.g. [4096, 65536]: extrapolation watched while training
    # (on induction heads it rose and fell by 10-40 points between checkpoints).
    val_lengths: list[int] = field(default_factory=list)
    val_examples: int = 64
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        check_task(self.task)
        _check(isinstance(self.preset, str) and self.preset in PRESETS,
               f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        d = TASK_DEFAULTS[self.task]
        for name in ("train_len", "steps", "batch_size", "lr", "warmup"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(d, name))
        if self.start_len == "default":
            self.start_len = None if d.start_len is None else min(d.start_len, self.train_len)
        if self.weight_decay == "default":
            self.weight_decay = d.weight_decay
        _check(isinstance(self.options, dict), f"task options must be a table; got {self.options!r}")
        _check(isinstance(self.model, dict), f"model overrides must be a table; got {self.model!r}")
        self.options = {**d.options, **self.options}
        if self.state_passing == "default":
            self.state_passing = d.state_passing and set(self.model_config().layers) <= set(RECURRENT_LAYERS)
        self.validate()

    def validate(self) -> None:
        for name in ("train_len", "steps", "batch_size", "eval_every", "val_examples", "save_every", "log_every",
                     "keep_checkpoints"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   f"task.{name} must be a positive integer; got {value!r}")
        if self.start_len == 0:
            self.start_len = None
        _check(self.start_len is None or (isinstance(self.start_len, int) and 1 <= self.start_len),
               f"task.start_len must be a positive integer, or 0 for no curriculum; got {self.start_len!r}")
        _check(isinstance(self.warmup, int) and self.warmup >= 0, f"task.warmup must be >= 0; got {self.warmup!r}")
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**20,
               f"task.seed must be in 0..2^20; got {self.seed!r}")
        _check(self.lr > 0, f"task.lr must be positive; got {self.lr}")
        _check(isinstance(self.weight_decay, (int, float)) and not isinstance(self.weight_decay, bool)
               and self.weight_decay >= 0, f"task.weight_decay must be a number >= 0; got {self.weight_decay!r}")
        _check(self.grad_clip >= 0, f"task.grad_clip must be >= 0 (0 disables); got {self.grad_clip}")
        _check(isinstance(self.state_passing, bool), f"task.state_passing must be true or false; got {self.state_passing!r}")
        allowed = task_options(self.task)
        unknown = sorted(set(self.options) - set(allowed))
        _check(not unknown, f"unknown option(s) {', '.join(unknown)} for task {self.task!r}; "
                            f"valid: {', '.join(allowed) or 'none'}")
        if self.task == "passkey":
            _check("depth" not in self.options, "passkey training places the note at random depths; "
                                                "choose evaluation depths with task eval --depths")
        _check(isinstance(self.val_lengths, list), f"task.val_lengths must be a list of lengths; got {self.val_lengths!r}")
        if self.val_lengths:
            check_lengths(self.task, self.train_options(), self.val_lengths)
        shortest = task_min_length(self.task, self.options)
        _check(self.train_len >= shortest,
               f"task {self.task!r} with {self.options} needs train_len >= {shortest}; got {self.train_len}")
        if self.start_len is not None:
            self.start_len = min(max(self.start_len, shortest), self.train_len)
        # The generator checks the options' values (vocab, pairs, digits).
        make_batch(self.task, 1, shortest, seed=0, **self.train_options())
        layers = self.model_config().layers  # model overrides are checked now, not after training started
        if self.state_passing:
            other = sorted(set(layers) - set(RECURRENT_LAYERS))
            _check(not other, f"task.state_passing needs a model whose layers are all recurrent "
                              f"({', '.join(RECURRENT_LAYERS)}); preset {self.preset!r} has {', '.join(other)} layers")

    def train_options(self) -> dict[str, Any]:
        return dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TaskConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        _check(not unknown, f"unknown task config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"invalid task config: {e}") from None

    def vocab_size(self) -> int:
        return 256 if self.task == "passkey" else int(self.options["vocab"])

    def model_config(self) -> ModelConfig:
        """The preset's model for this task, with ``self.model`` overrides on top."""
        d = TASK_DEFAULTS[self.task]
        base: dict[str, Any] = {"vocab_size": self.vocab_size(), "d_model": d.d_model, "n_heads": 4, "pos": "rope"}
        n = d.n_layers
        if self.preset == "attention":
            base["layers"] = ["attention"] * n
        elif self.preset == "longnet":
            # Patterns from the first segment up to 2^20 tokens (the longest default evaluation):
            # every pair of tokens up to that distance interacts in some pattern.  max_seq_len
            # stays unset: beyond the longest segment the model runs, but far tokens never meet.
            segments, rates = dilated_patterns(2**20, first_segment=64)
            base.update(layers=["dilated"] * n, dilated_segments=segments, dilated_rates=rates)
        elif self.preset in ("mamba", "s4d"):
            base.update(layers=["mamba"] * n, mlp_hidden=0, ssm_selective=self.preset == "mamba")
        elif self.preset == "mamba2":
            base.update(layers=["mamba2"] * n, mlp_hidden=0, ssm_state=64, ssm_head_dim=32)
        elif self.preset == "hybrid":
            base.update(layers=["mamba"] * (n - 1) + ["attention"], mlp_hidden=0)
        values = {**base, **self.model}
        if "vocab_size" in self.model:
            _check(self.model["vocab_size"] >= self.vocab_size(),
                   f"model.vocab_size {self.model['vocab_size']} is smaller than the task's {self.vocab_size()}")
        return ModelConfig.from_dict(values)


def apply_overrides(cfg_values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set`` overrides on a TaskConfig's values: ``task.KEY=V`` (a task option such as
    ``task.pairs=8`` or a TaskConfig field such as ``task.lr=1e-3``) and ``model.KEY=V``."""
    from longctx.train.config import parse_override

    values = {**cfg_values, "options": dict(cfg_values.get("options", {})), "model": dict(cfg_values.get("model", {}))}
    fields = {f.name for f in dataclasses.fields(TaskConfig)} - {"options", "model", "task", "preset"}
    for text in overrides:
        ((section, table),) = parse_override(text).items()
        ((key, value),) = table.items()
        if section == "model":
            values["model"][key] = value
        elif section == "task" and key in fields:
            values[key] = value
        elif section == "task":
            values["options"][key] = value
        else:
            raise ConfigError(f"--set {text!r}: sections are 'task' (options and training fields) and 'model'")
    return values


# TaskConfig fields a preset spec may set for one preset of a comparison.
TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig)
                        if f.name not in ("task", "preset", "options", "model", "seed"))


# ---------------------------------------------------------------------------------------
# Training


@dataclass
class TaskTrainResult:
    step: int
    interrupted: bool  # a signal (Ctrl-C, SIGTERM) stopped it
    out_of_budget: bool  # the time budget ended it before cfg.steps
    train_seconds: float
    parameters: int
    tokens_per_s: float
    val_accuracy: float | None


def _train_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def train_length(cfg: TaskConfig, step: int) -> int:
    """The training length at ``step`` (0-based): the curriculum's, or ``train_len``."""
    if cfg.start_len is None:
        return cfg.train_len
    return min(cfg.train_len, cfg.start_len * 2 ** min(step // cfg.grow_every, 40))


def train_batch_size(cfg: TaskConfig, step: int) -> int:
    """Examples per step: ``batch_size`` at ``train_len``, more at the curriculum's shorter
    lengths (the same number of tokens)."""
    return max(cfg.batch_size, cfg.batch_size * cfg.train_len // train_length(cfg, step))


def tokens_seen(cfg: TaskConfig, steps: int) -> int:
    """Training tokens in the first ``steps`` steps."""
    if cfg.start_len is None:
        return steps * cfg.batch_size * cfg.train_len
    return sum(train_batch_size(cfg, s) * train_length(cfg, s) for s in range(steps))


def _train_batch(cfg: TaskConfig, step: int):
    options = cfg.train_options()
    seed = _train_seed(cfg.seed, step)
    if cfg.task == "passkey":
        options["depth"] = _PASSKEY_TRAIN_DEPTHS[seed % len(_PASSKEY_TRAIN_DEPTHS)]
    return make_batch(cfg.task, train_batch_size(cfg, step), train_length(cfg, step), seed=seed, **options)


def task_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy on the asked positions and the number of correct argmaxes there."""
    asked = targets != IGNORE
    picked = logits[asked].float()
    wanted = targets[asked]
    return F.cross_entropy(picked, wanted), (picked.argmax(-1) == wanted).sum()


@torch.no_grad()
def validation_accuracy(model: LanguageModel, cfg: TaskConfig) -> dict[int, float | str]:
    """Accuracy on fixed examples at the training length and at ``cfg.val_lengths`` (seeds
    disjoint from training's): ``{length: accuracy}``, or "out of memory" for a length the
    evaluation cannot fit."""
    was = model.training
    model.eval()
    try:
        result = evaluate_task(model, cfg, sorted({cfg.train_len, *cfg.val_lengths}), examples=cfg.val_examples,
                               batch=cfg.batch_size, seed=cfg.seed + 7919)
    finally:
        model.train(was)
    return dict(result["accuracy"])


def write_task_config(run_dir: Path, cfg: TaskConfig) -> None:
    write_json_atomic(run_dir / "config.json",
                      {"kind": RUN_KIND, "task": cfg.to_dict(), "model": cfg.model_config().to_dict()})


def read_task_config(run_dir: str | Path, task: str | None = None) -> tuple[TaskConfig, ModelConfig]:
    """The TaskConfig and ModelConfig a task run was made with; a clear error for another
    kind of run directory, or (with ``task``) a run of another task."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    values = read_run_config(run_dir)
    if values.get("kind") != RUN_KIND:
        what = "a language-model run (longctx train)" if "train" in values and "data" in values else \
            "not a task run"
        raise ConfigError(f"{run_dir} is {what}, not a synthetic-task run made by 'longctx task train'; "
                          "use 'longctx eval' for language-model runs")
    cfg = TaskConfig.from_dict(values["task"])
    if task is not None and task != cfg.task:
        check_task(task)
        raise ConfigError(f"{run_dir} is a run of task {cfg.task!r}, not {task!r}; evaluate it on its own task "
                          "or train another run")
    return cfg, ModelConfig.from_dict(values["model"])


def load_task_run(run_dir: str | Path, checkpoint: str | None = None, task: str | None = None):
    """``(TaskConfig, LanguageModel in eval mode, checkpoint path)`` of a task run."""
    cfg, model_cfg = read_task_config(run_dir, task)
    run_dir = Path(run_dir)
    if checkpoint is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first "
                                  f"(longctx task train --out {run_dir})")
    else:
        path = run_dir / "checkpoints" / checkpoint
        if not path.is_dir():
            names = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
            raise CheckpointError(f"no checkpoint {checkpoint!r} in {run_dir}; available: {names}")
    model = LanguageModel(model_cfg)
    load_model_weights(model, path / "model.safetensors")
    model.eval()
    return cfg, model, path


def _prepare(cfg: TaskConfig, run_dir: Path, resume: bool) -> None:
    if not resume:
        if list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        if (run_dir / "config.json").is_file():
            read_task_config(run_dir)  # refuse to write into another kind of run directory
        return
    saved, _ = read_task_config(run_dir)
    if latest_checkpoint(run_dir) is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from; train without --resume")
    if saved.task != cfg.task:
        raise ConfigError(f"{run_dir} is a run of task {saved.task!r}, not {cfg.task!r}")
    a, b = saved.to_dict(), cfg.to_dict()
    fixed = ("preset", "train_len", "batch_size", "seed", "options", "model")
    changed = [k for k in fixed if a[k] != b[k]]
    _check(not changed, f"task.{', task.'.join(changed)} differ from the settings {run_dir} was trained with; "
                        "resume without changing them, or start a new run with another --out")


def _train_config(cfg: TaskConfig) -> TrainConfig:
    """The TrainConfig the shared optimizer and schedule read."""
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.train_len, lr=cfg.lr,
                       warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                       seed=cfg.seed, beta2=0.98)


def train_task(
    cfg: TaskConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    budget_minutes: float | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TaskTrainResult:
    """Train ``cfg`` into ``run_dir`` (with ``resume``: continue its latest checkpoint).

    ``budget_minutes`` stops training (saving a checkpoint) when this session's training
    time would exceed it; ``stop_at`` saves and returns after that step.  A finished run
    resumed returns at once.
    """
    run_dir = Path(run_dir)
    _check(budget_minutes is None or budget_minutes > 0, f"budget minutes must be positive; got {budget_minutes}")
    run_dir.mkdir(parents=True, exist_ok=True)
    _prepare(cfg, run_dir, resume)
    session_start = time.perf_counter()
    tc = _train_config(cfg)
    torch.manual_seed(cfg.seed)
    model = LanguageModel(cfg.model_config())
    optimizer = make_optimizer(model, tc)
    step, seconds_before, compute_seconds = 0, 0.0, 0.0
    carry = None  # state passing: the last step's final state, detached (ModelState)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        trainer = load_checkpoint(ckpt, model, optimizer)
        step = trainer["step"]
        seconds_before = float(trainer.get("train_seconds", 0.0))
        compute_seconds = float(trainer.get("compute_seconds", 0.0))
        if cfg.state_passing and trainer.get("carry_batch"):
            carry = model.init_state(trainer["carry_batch"])
            carry.load_state_dict(load_extra_tensors(ckpt))
        log(f"resumed from {ckpt} at step {step}")
    start_step = step
    write_task_config(run_dir, cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume else None)
    n_params = model.num_parameters()
    log(f"task {cfg.task} ({cfg.options}), preset {cfg.preset}: {', '.join(model.config.layers)}, "
        f"d_model {model.config.d_model}, {n_params:,} parameters; {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.train_len} tokens"
        + ("" if cfg.start_len is None else f" (lengths from {cfg.start_len}, doubling every {cfg.grow_every} steps, "
                                            "at the same tokens per step)"))

    def train_seconds() -> float:
        """Wall time of training, over every session of this run (validation and saving included)."""
        return seconds_before + time.perf_counter() - session_start

    def checkpoint() -> None:
        save_checkpoint(run_dir, step, model, optimizer,
                        {"seed": cfg.seed, "data_position": step, "train_seconds": train_seconds(),
                         "compute_seconds": compute_seconds, "carry_batch": carry and carry.batch_size},
                        cfg.keep_checkpoints, extra_tensors=carry and carry.state_dict())

    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    budget = None if budget_minutes is None else budget_minutes * 60.0
    interrupted = out_of_budget = False
    val_acc = None
    loss_sum, correct, asked, window_steps, window_tokens = 0.0, 0, 0, 0, 0
    window_start = time.perf_counter()
    step_seconds = 0.0
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    with _stop_on_signal() as stop_flag:
        while step < end:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = _train_batch(cfg, step)
            state = None
            if cfg.state_passing:
                state = carry if carry is not None and carry.batch_size == x.shape[0] else model.init_state(x.shape[0])
            loss, n_correct = task_loss(model(x, state), y)
            loss.backward()
            if state is not None:  # the next step starts here, without this step's graph
                carry = model.init_state(x.shape[0])
                carry.load_state_dict(state.state_dict())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {step + 1}; lower task.lr "
                                         "or raise task.warmup")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_seconds = time.perf_counter() - t0
            compute_seconds += step_seconds
            loss_sum += loss_value
            correct += int(n_correct)
            asked += int((y != IGNORE).sum())
            window_steps += 1
            window_tokens += x.numel()
            bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / max(elapsed, 1e-9)
                record = {"step": step, "loss": loss_sum / window_steps, "accuracy": correct / max(asked, 1),
                          "lr": lr, "grad_norm": float(grad_norm), "length": x.shape[1],
                          "tokens": tokens_seen(cfg, step), "tokens_per_s": tok_s, "train_seconds": train_seconds()}
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}", tok_s=f"{tok_s:,.0f}")
                loss_sum, correct, asked, window_steps, window_tokens = 0.0, 0, 0, 0, 0
                window_start = time.perf_counter()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                accs = validation_accuracy(model, cfg)
                val_acc = float(accs.pop(cfg.train_len))
                record = {"step": step, "val_accuracy": val_acc}
                if accs:
                    record["val_accuracy_at"] = {str(n): a for n, a in accs.items()}
                metrics.write(record)
                further = "".join(f", at {n}: {a:.3f}" if isinstance(a, float) else f", at {n}: {a}"
                                  for n, a in accs.items())
                bar.write(f"step {step}: accuracy at length {cfg.train_len}: {val_acc:.3f}{further}")
            if stop_flag["stop"]:
                interrupted = True
                break
            if budget is not None and step < end and time.perf_counter() - session_start + step_seconds > budget:
                out_of_budget = True
                break
            if step % cfg.save_every == 0 or step == end:
                checkpoint()
    bar.close()
    if interrupted or out_of_budget:
        checkpoint()
        why = "interrupted" if interrupted else f"time budget of {budget_minutes:g} minutes reached"
        log(f"{why} at step {step}/{cfg.steps}; checkpoint saved. Continue with: "
            f"longctx task train --out {run_dir} --resume")
    records = read_metrics(run_dir / "metrics.jsonl")
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    # Throughput of the training steps themselves (validation and checkpoints excluded).
    tokens_per_s = tokens_seen(cfg, step) / compute_seconds if compute_seconds else (rates[-1] if rates else 0.0)
    wall = train_seconds() if step > start_step or not resume else seconds_before
    if val_acc is None:
        vals = [r["val_accuracy"] for r in records if "val_accuracy" in r]
        val_acc = vals[-1] if vals else None
    summary = {"task": cfg.task, "preset": cfg.preset, "step": step, "steps": cfg.steps,
               "finished": step >= cfg.steps, "out_of_budget": out_of_budget, "train_seconds": wall,
               "parameters": n_params, "tokens_per_s": tokens_per_s, "val_accuracy": val_acc,
               "train_len": cfg.train_len, "batch_size": cfg.batch_size}
    write_json_atomic(run_dir / "summary.json", summary)
    plot_task_training(run_dir / "metrics.jsonl", run_dir / "training.png", chance=chance_level(cfg.task, cfg.options))
    return TaskTrainResult(step, interrupted, out_of_budget, wall, n_params, tokens_per_s, val_acc)


# ---------------------------------------------------------------------------------------
# Evaluation of a run, and the comparison of presets


def evaluate_run(
    run_dir: str | Path,
    lengths: list[int] | None = None,
    *,
    task: str | None = None,
    checkpoint: str | None = None,
    **eval_options,
) -> dict[str, Any]:
    """``evaluate_task`` on a task run's model (its task and options); ``lengths`` default to
    the task's standard ones.  The result also names the run, its checkpoint and preset."""
    cfg, model, path = load_task_run(run_dir, checkpoint, task)
    lengths = list(TASK_DEFAULTS[cfg.task].eval_lengths) if lengths is None else list(lengths)
    check_lengths(cfg.task, cfg.options, lengths)
    result = evaluate_task(model, cfg, lengths, **eval_options)
    result.update(run=str(run_dir), checkpoint=path.name, preset=cfg.preset, train_len=cfg.train_len)
    return result


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": load,
            "platform": platform.platform(), "torch": torch.__version__}


def compare(
    task: str,
    presets: list[str],
    out_dir: str | Path,
    *,
    lengths: list[int] | None = None,
    budget_minutes: float | None = None,
    eval_minutes: float | None = 10.0,
    overrides: list[str] = (),
    train_len: int | None = None,
    steps: int | None = None,
    examples: int = 100,
    eval_batch: int = 8,
    max_memory: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and evaluate each preset on ``task``; write ``out_dir/report.md``,
    ``accuracy.png`` and ``results.json`` (one run directory per preset under ``out_dir``).

    ``presets`` are names of ``PRESETS``, optionally with model overrides
    (``"mamba:ssm_state=4"``).  ``budget_minutes`` caps each preset's training time,
    ``eval_minutes`` its evaluation time (lengths beyond it are reported "over budget").
    A run directory that already holds a run of the same settings is resumed (or reused
    when finished), so an interrupted comparison continues where it stopped.
    """
    check_task(task)
    _check(bool(presets), f"no presets given; choose from {', '.join(PRESETS)}")
    specs = [(p, *parse_preset(p)) for p in presets]
    labels = [spec[0] for spec in specs]
    _check(len(set(labels)) == len(labels), f"presets repeat: {', '.join(labels)}")
    lengths = list(TASK_DEFAULTS[task].eval_lengths) if lengths is None else list(lengths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build (and so validate) every config before the first, long, training starts.
    configs = {}
    for label, name, model_overrides, training_overrides in specs:
        values = {"task": task, "preset": name, "train_len": train_len, "steps": steps}
        values = apply_overrides(values, list(overrides))
        values["model"] = {**values["model"], **model_overrides}
        values.update(training_overrides)
        configs[label] = TaskConfig.from_dict(values)
        check_lengths(task, configs[label].options, lengths)
    machine_start = machine_info()
    rows = []
    for label, cfg in configs.items():
        run = out_dir / label.replace(":", "_").replace("=", "-")
        resume = latest_checkpoint(run) is not None if run.is_dir() and (run / "checkpoints").is_dir() else False
        log(f"== {label}: training into {run}" + (" (resuming)" if resume else ""))
        t0 = time.perf_counter()
        result = train_task(cfg, run, resume=resume, budget_minutes=budget_minutes, progress=progress, log=log)
        if result.interrupted:
            raise KeyboardInterrupt
        log(f"== {label}: evaluating at {len(lengths)} lengths")
        t1 = time.perf_counter()
        ev = evaluate_run(run, lengths, examples=examples, batch=eval_batch,
                          budget_seconds=None if eval_minutes is None else eval_minutes * 60.0,
                          max_memory=max_memory, log=log)
        summary = json.loads((run / "summary.json").read_text())
        rows.append({
            "label": label, "preset": cfg.preset, "layers": cfg.model_config().layers, "run": str(run),
            "parameters": result.parameters, "steps": result.step, "steps_planned": cfg.steps,
            "out_of_budget": summary.get("out_of_budget", False), "train_seconds": result.train_seconds,
            "train_tokens_per_s": result.tokens_per_s, "val_accuracy": result.val_accuracy,
            "eval_seconds": time.perf_counter() - t1, "wall_seconds_session": time.perf_counter() - t0,
            "accuracy": ev["accuracy"], "by_depth": ev.get("by_depth"), "eval_seconds_by_length": ev["seconds"],
            "eval_tokens_per_s": ev["tokens_per_s"], "train_len": cfg.train_len, "batch_size": cfg.batch_size,
            "lr": cfg.lr,
        })
    any_cfg = next(iter(configs.values()))
    meta = {"task": task, "options": any_cfg.options, "train_len": any_cfg.train_len, "lengths": lengths,
            "chance": chance_level(task, any_cfg.options), "examples": examples,
            "note": TASK_DEFAULTS[task].note, "machine_start": machine_start, "machine_end": machine_info(),
            "budget_minutes": budget_minutes, "eval_minutes": eval_minutes}
    paths = write_report(out_dir, meta, rows)
    return {"meta": meta, "rows": rows, "paths": {k: str(v) for k, v in paths.items()}}


__all__ = [
    "EVAL_SEED_BASE", "FAMILIES", "PRESETS", "TASK_DEFAULTS", "TASK_NAMES", "TaskConfig", "TaskTrainResult", "apply_overrides",
    "compare", "evaluate_run", "load_task_run", "parse_preset", "read_task_config", "train_task",
]

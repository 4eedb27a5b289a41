"""Synthetic-task runs: what a run trains (task, architecture, training setup), the task
defaults, and the run directory's config.

A task run directory (``longctx task train --out RUN``)::

    RUN/config.json        {"kind": "task", "task": TaskConfig, "model": ModelConfig}
    RUN/checkpoints/...    atomic checkpoints (longctx.train.checkpoint), resumable
    RUN/metrics.jsonl      loss, accuracy on the asked positions, lr, tokens/s per log step;
                           validation accuracy at the training length every ``eval_every`` steps
    RUN/summary.json       steps done, training wall time, parameters, tokens/s, final accuracy
    RUN/training.png       loss and accuracy against step

An architecture (``ARCHS``) names a model family; the model size and training setup come
from the task (its paper's, scaled to train in about 15 minutes on 2 CPU cores), see
``TASK_DEFAULTS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longctx.data.backspace import ERROR_RULES
from longctx.data.synthetic import ADDITION_VOCAB, TASKS, addition_min_length, make_batch
from longctx.eval.tasks import check_lengths, task_min_length, task_options
from longctx.model.config import ConfigError, ModelConfig
from longctx.ops.dilated import dilated_patterns
from longctx.train.checkpoint import CheckpointError, read_run_config, write_json_atomic
from longctx.train.tasks.mechanisms import MECHANISM_OFFSETS, mechanism_ids
from longctx.validation import check, check_fields, non_negative_int, positive_int

RUN_KIND = "task"
# The architectures, and (last) "s4d": the mamba architecture made time-invariant
# (model.ssm_selective = false), the Mamba paper's baseline for selective copying.
ARCHS = ("attention", "longnet", "mamba", "mamba2", "hybrid", "s4d")
COMPARED_ARCHS = ARCHS[:-1]  # compare's default
RECURRENT_LAYERS = ("mamba", "mamba2")  # mixers whose whole past is a fixed-size state (task.state_passing)
TASK_NAMES = tuple(TASKS)


@dataclass(frozen=True)
class TaskDefaults:
    """One task's setup: the paper's model shape, a CPU-sized training run and default
    evaluation lengths (the README's task results say how each differs from its paper)."""

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
    state_passing: bool = False  # TaskConfig.state_passing for architectures whose layers are all recurrent


def _powers(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(2**k for k in range(lo, hi + 1))


# Model shape of the papers (2 layers, d_model 64); steps and batch sized for about 15 minutes
# of training on 2 CPU cores (the README's task results give the times measured).
TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "induction": TaskDefaults(
        train_len=256, steps=3000, batch_size=16, lr=3e-3, warmup=50, options={"vocab": 16}, start_len=16,
        eval_lengths=_powers(8, 20), weight_decay=0.0, state_passing=True,
    ),
    "selective_copying": TaskDefaults(
        train_len=512, steps=3000, batch_size=16, lr=3e-3, warmup=50, options={"vocab": 16, "n_tokens": 16},
        start_len=32,
        eval_lengths=_powers(9, 16),
    ),
    "mqar": TaskDefaults(
        train_len=128, steps=3000, batch_size=16, lr=1e-3, warmup=50, options={"vocab": 64, "pairs": 8},
        start_len=32,
        eval_lengths=_powers(7, 12),
    ),
    "passkey": TaskDefaults(
        train_len=256, steps=3000, batch_size=16, lr=3e-3, warmup=50, options={"digits": 5}, start_len=128,
        eval_lengths=_powers(8, 14),
    ),
    # Not a long-context task: the shortest example (no noise before it), where pause tokens
    # may add the computation the first digit of the sum needs.
    "addition": TaskDefaults(
        train_len=addition_min_length(4), steps=3000, batch_size=64, lr=1e-3, warmup=50, options={"digits": 4},
        eval_lengths=(addition_min_length(4),),
    ),
}

# Depths of the note while training passkey models: a fresh random depth per example batch.
PASSKEY_TRAIN_DEPTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def check_task(task: str) -> str:
    check(task in TASKS, f"unknown task {task!r}; choose one of {', '.join(TASK_NAMES)}")
    return task


def parse_arch(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``"mamba"`` -> ``("mamba", {}, {})``; ``"mamba:ssm_state=64:lr=0.003"`` -> the architecture,
    its model overrides and its training overrides (keys that are ``TaskConfig`` training
    fields: ``lr``, ``steps``, ``warmup``, ...; values read as TOML: numbers, booleans,
    lists; else strings).  Architectures learn best at different settings (Zoology sweeps
    the learning rate per model), so a comparison can give each its own."""
    from longctx.train.config import parse_override

    name, *pairs = spec.strip().split(":")
    check(name in ARCHS, f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)} "
                            "(optionally with model or training overrides: mamba:ssm_state=64:lr=0.003)")
    model: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for pair in pairs:
        check("=" in pair, f"architecture {spec!r}: expected NAME:key=value[:key=value...]; got {pair!r}")
        ((key, value),) = parse_override(f"model.{pair}")["model"].items()
        (training if key in TRAINING_FIELDS else model)[key] = value
    return name, model, training


@dataclass
class TaskConfig:
    """A task run: which task and architecture, the training setup, task options and model
    overrides.  ``None`` fields take the task's defaults (``TASK_DEFAULTS``) on construction,
    so a saved config holds resolved values."""

    task: str = "induction"
    arch: str = "mamba"
    train_len: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float | str = "default"  # "default": the task's (TASK_DEFAULTS)
    grad_clip: float = 1.0
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # task options over the defaults: vocab, pairs, ...
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides over the architecture's
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
    # Mechanism tokens (longctx.train.tasks.mechanisms): pauses after the prompt in training
    # and evaluation; pauses at random places of training sequences (pretraining); filler:
    # ordinary tokens after the prompt instead of pauses (the control for their count);
    # eval_pauses: pauses after the prompt at evaluation (None: as in training; with
    # pauses = 0, the paper's inference-only control); backspace_rate: injected mistakes
    # followed by <backspace>, drawn by backspace_errors (uniform or context).  Memory tokens
    # are model settings (model.memory_tokens, memory_segment, memory_bptt).
    pauses: int = 0
    pretrain_pauses: int = 0
    filler: int = 0
    eval_pauses: int | None = None
    backspace_rate: float = 0.0
    backspace_errors: str = "uniform"
    eval_every: int = 100  # validation accuracy at train_len every this many steps
    # Further validation lengths, e.g. [4096, 65536]: extrapolation watched while training
    # (on induction heads it rose and fell by 10-40 points between checkpoints).
    val_lengths: list[int] = field(default_factory=list)
    val_examples: int = 64
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        check_fields(self, "task")
        check_task(self.task)
        check(isinstance(self.arch, str) and self.arch in ARCHS,
              f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        d = TASK_DEFAULTS[self.task]
        for name in ("train_len", "steps", "batch_size", "lr", "warmup"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(d, name))
        if self.start_len == "default":
            self.start_len = None if d.start_len is None else min(d.start_len, self.train_len)
        if self.weight_decay == "default":
            self.weight_decay = d.weight_decay
        check(isinstance(self.options, dict), f"task options must be a table; got {self.options!r}")
        check(isinstance(self.model, dict), f"model overrides must be a table; got {self.model!r}")
        self.options = {**d.options, **self.options}
        if self.state_passing == "default":
            self.state_passing = d.state_passing and set(self.model_config().layers) <= set(RECURRENT_LAYERS)
        self.validate()

    def validate(self) -> None:
        for name in ("train_len", "steps", "batch_size", "eval_every", "val_examples", "save_every", "log_every",
                     "keep_checkpoints"):
            value = getattr(self, name)
            positive_int(f"task.{name}", value, error=ConfigError)
        if self.start_len == 0:
            self.start_len = None
        check(self.start_len is None or (isinstance(self.start_len, int) and 1 <= self.start_len),
              f"task.start_len must be a positive integer, or 0 for no curriculum; got {self.start_len!r}")
        check(isinstance(self.warmup, int) and self.warmup >= 0, f"task.warmup must be >= 0; got {self.warmup!r}")
        check(isinstance(self.seed, int) and 0 <= self.seed < 2**20,
              f"task.seed must be in 0..2^20; got {self.seed!r}")
        check(self.lr > 0, f"task.lr must be positive; got {self.lr}")
        check(isinstance(self.weight_decay, (int, float)) and not isinstance(self.weight_decay, bool)
              and self.weight_decay >= 0, f"task.weight_decay must be a number >= 0; got {self.weight_decay!r}")
        check(self.grad_clip >= 0, f"task.grad_clip must be >= 0 (0 disables); got {self.grad_clip}")
        check(isinstance(self.state_passing, bool), f"task.state_passing must be true or false; got {self.state_passing!r}")
        self._check_mechanisms()
        allowed = task_options(self.task)
        unknown = sorted(set(self.options) - set(allowed))
        check(not unknown, f"unknown option(s) {', '.join(unknown)} for task {self.task!r}; "
                            f"valid: {', '.join(allowed) or 'none'}")
        if self.task == "passkey":
            check("depth" not in self.options, "passkey training places the note at random depths; "
                                                "choose evaluation depths with task eval --depths")
        check(isinstance(self.val_lengths, list), f"task.val_lengths must be a list of lengths; got {self.val_lengths!r}")
        if self.val_lengths:
            check_lengths(self.task, self.train_options(), self.val_lengths)
        shortest = task_min_length(self.task, self.options)
        check(self.train_len >= shortest,
              f"task {self.task!r} with {self.options} needs train_len >= {shortest}; got {self.train_len}")
        if self.start_len is not None:
            self.start_len = min(max(self.start_len, shortest), self.train_len)
        # The generator checks the options' values (vocab, pairs, digits).
        make_batch(self.task, 1, shortest, seed=0, **self.train_options())
        layers = self.model_config().layers  # model overrides are checked now, not after training started
        if self.state_passing:
            other = sorted(set(layers) - set(RECURRENT_LAYERS))
            check(not other, f"task.state_passing needs a model whose layers are all recurrent "
                              f"({', '.join(RECURRENT_LAYERS)}); architecture {self.arch!r} has {', '.join(other)} layers")

    def _check_mechanisms(self) -> None:
        for name in ("pauses", "pretrain_pauses", "filler"):
            non_negative_int(f"task.{name}", getattr(self, name), error=ConfigError)
        if self.eval_pauses is not None:
            non_negative_int("task.eval_pauses", self.eval_pauses, error=ConfigError)
        check(not (self.filler and (self.pauses or self.pretrain_pauses or self.eval_pauses)),
              "task.filler is the control for pauses (as many ordinary tokens in their place): set it or "
              "task.pauses / pretrain_pauses / eval_pauses, not both")
        check(0.0 <= self.backspace_rate <= 1.0, f"task.backspace_rate must be in [0, 1]; got {self.backspace_rate}")
        check(self.backspace_errors in ERROR_RULES,
              f"task.backspace_errors must be one of {', '.join(ERROR_RULES)}; got {self.backspace_errors!r}")

    def train_options(self) -> dict[str, Any]:
        return dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TaskConfig":
        if "preset" in values and "arch" not in values:  # runs saved before the field was named arch
            values = {("arch" if k == "preset" else k): v for k, v in values.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        check(not unknown, f"unknown task config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"invalid task config: {e}") from None

    def vocab_size(self) -> int:
        return {"passkey": 256, "addition": ADDITION_VOCAB}.get(self.task) or int(self.options["vocab"])

    def model_config(self) -> ModelConfig:
        """The architecture's model for this task, with ``self.model`` overrides on top."""
        d = TASK_DEFAULTS[self.task]
        base: dict[str, Any] = {"vocab_size": self.vocab_size(), "d_model": d.d_model, "n_heads": 4, "pos": "rope"}
        n = d.n_layers
        if self.arch == "attention":
            base["layers"] = ["attention"] * n
        elif self.arch == "longnet":
            # Patterns from the first segment up to 2^20 tokens (the longest default evaluation):
            # every pair of tokens up to that distance interacts in some pattern.  max_seq_len
            # stays unset: beyond the longest segment the model runs, but far tokens never meet.
            segments, rates = dilated_patterns(2**20, first_segment=64)
            base.update(layers=["dilated"] * n, dilated_segments=segments, dilated_rates=rates)
        elif self.arch in ("mamba", "s4d"):
            base.update(layers=["mamba"] * n, mlp_hidden=0, ssm_selective=self.arch == "mamba")
        elif self.arch == "mamba2":
            base.update(layers=["mamba2"] * n, mlp_hidden=0, ssm_state=64, ssm_head_dim=32)
        elif self.arch == "hybrid":
            base.update(layers=["mamba"] * (n - 1) + ["attention"], mlp_hidden=0)
        ids = mechanism_ids(self)
        if ids:  # ids after the task's vocabulary (longctx.train.tasks.mechanisms)
            base.update(vocab_size=self.vocab_size() + len(MECHANISM_OFFSETS), special_tokens=ids)
        values = {**base, **self.model}
        if "vocab_size" in self.model:
            check(self.model["vocab_size"] >= self.vocab_size(),
                  f"model.vocab_size {self.model['vocab_size']} is smaller than the task's {self.vocab_size()}")
        return ModelConfig.from_dict(values)


def apply_overrides(cfg_values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set`` overrides on a TaskConfig's values: ``task.KEY=V`` (a task option such as
    ``task.pairs=8`` or a TaskConfig field such as ``task.lr=1e-3``) and ``model.KEY=V``."""
    from longctx.train.config import parse_override

    values = {**cfg_values, "options": dict(cfg_values.get("options", {})), "model": dict(cfg_values.get("model", {}))}
    fields = {f.name for f in dataclasses.fields(TaskConfig)} - {"options", "model", "task", "arch"}
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


# TaskConfig fields an architecture spec may set for one architecture of a comparison.
TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig)
                        if f.name not in ("task", "arch", "options", "model", "seed"))


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

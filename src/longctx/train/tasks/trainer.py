"""Training a model on a synthetic task, on the shared loop (``longctx.train.loop``).

Every step draws a fresh batch from the task's generator seeded by ``(seed, step)``
(``longctx.data.synthetic``), so an interrupted run resumes exactly: weights, optimizer and
RNG come from the checkpoint and the data position is the step itself.  The loss is the
cross-entropy on the asked positions only (targets != ``IGNORE``).  Pauses, filler and
injected mistakes transform each batch (``longctx.train.tasks.mechanisms``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from longctx.data.synthetic import IGNORE, make_batch
from longctx.eval.report import plot_task_training
from longctx.eval.tasks import chance_level, evaluate_task
from longctx.model import LanguageModel
from longctx.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_extra_tensors,
    load_model_weights,
    save_checkpoint,
    write_json_atomic,
)
from longctx.train.config import TrainConfig
from longctx.train.loop import LoopSettings, StepOutput, Window, prepare_run_dir, run_loop
from longctx.train.metrics import MetricsLog, read_metrics
from longctx.train.optim import make_optimizer
from longctx.train.tasks.config import PASSKEY_TRAIN_DEPTHS, TaskConfig, read_task_config, write_task_config
from longctx.train.tasks.mechanisms import eval_after_prompt, train_transform
from longctx.validation import check

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


def train_batch(cfg: TaskConfig, step: int):
    """The ``(inputs, targets)`` of training step ``step``: the task's examples with the
    run's pauses, filler and mistakes."""
    options = cfg.train_options()
    seed = _train_seed(cfg.seed, step)
    if cfg.task == "passkey":
        options["depth"] = PASSKEY_TRAIN_DEPTHS[seed % len(PASSKEY_TRAIN_DEPTHS)]
    inputs, targets = make_batch(cfg.task, train_batch_size(cfg, step), train_length(cfg, step), seed=seed, **options)
    return train_transform(cfg, inputs, targets, seed)


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
                               batch=cfg.batch_size, seed=cfg.seed + 7919, after_prompt=eval_after_prompt(cfg))
    finally:
        model.train(was)
    return dict(result["accuracy"])


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


def _changed_settings(cfg: TaskConfig, run_dir: Path) -> list[str]:
    """Settings a resume may not change: the task, the architecture, its data and model."""
    saved, _ = read_task_config(run_dir)
    check(saved.task == cfg.task, f"{run_dir} is a run of task {saved.task!r}, not {cfg.task!r}")
    a, b = saved.to_dict(), cfg.to_dict()
    return [f"task.{k}" for k in ("arch", "train_len", "batch_size", "seed", "options", "model") if a[k] != b[k]]


def _train_config(cfg: TaskConfig) -> TrainConfig:
    """The TrainConfig the shared loop, optimizer and schedule read."""
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.train_len, lr=cfg.lr,
                       warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                       seed=cfg.seed, beta2=0.98, eval_every=cfg.eval_every, save_every=cfg.save_every,
                       log_every=cfg.log_every, keep_checkpoints=cfg.keep_checkpoints)


class _TaskRun:
    """The loop's hooks for a synthetic-task run (``LoopHooks``).

    With ``task.state_passing`` each step starts from ``carry``, the previous step's final
    state (detached); it is saved with every checkpoint."""

    def __init__(self, cfg: TaskConfig, run_dir: Path, model, optimizer, metrics: MetricsLog, *, carry,
                 seconds_before: float, compute_before: float) -> None:
        self.cfg, self.run_dir, self.model, self.optimizer, self.metrics = cfg, run_dir, model, optimizer, metrics
        self.carry, self.seconds_before, self.compute_before = carry, seconds_before, compute_before
        self.session_start = time.perf_counter()
        self.length = cfg.train_len  # of the last step's batch
        self.val_accuracy: float | None = None

    def train_seconds(self) -> float:
        """Wall time of training over every session of this run (validation and saving included)."""
        return self.seconds_before + time.perf_counter() - self.session_start

    def train_step(self, step: int) -> StepOutput:
        x, y = train_batch(self.cfg, step)
        state = None
        if self.cfg.state_passing:
            reuse = self.carry is not None and self.carry.batch_size == x.shape[0]
            state = self.carry if reuse else self.model.init_state(x.shape[0])
        loss, n_correct = task_loss(self.model(x, state), y)
        loss.backward()
        if state is not None:  # the next step starts here, without this step's graph
            self.carry = self.model.init_state(x.shape[0])
            self.carry.load_state_dict(state.state_dict())
        self.length = x.shape[1]
        return StepOutput(float(loss.detach()), x.numel(),
                          {"correct": int(n_correct), "asked": int((y != IGNORE).sum())})

    def log(self, step: int, window: Window) -> dict[str, str]:
        tok_s = window.tokens_per_s
        record = {"step": step, "loss": window.loss_sum / window.steps,
                  "accuracy": window.counts["correct"] / max(window.counts["asked"], 1), "lr": window.lr,
                  "grad_norm": window.grad_norm, "length": self.length, "tokens": tokens_seen(self.cfg, step),
                  "tokens_per_s": tok_s, "train_seconds": self.train_seconds()}
        self.metrics.write(record)
        return {"loss": f"{record['loss']:.3f}", "acc": f"{record['accuracy']:.2f}", "tok_s": f"{tok_s:,.0f}"}

    def validate(self, step: int) -> str:
        accs = validation_accuracy(self.model, self.cfg)
        self.val_accuracy = float(accs.pop(self.cfg.train_len))
        record = {"step": step, "val_accuracy": self.val_accuracy}
        if accs:
            record["val_accuracy_at"] = {str(n): a for n, a in accs.items()}
        self.metrics.write(record)
        further = "".join(f", at {n}: {a:.3f}" if isinstance(a, float) else f", at {n}: {a}" for n, a in accs.items())
        return f"step {step}: accuracy at length {self.cfg.train_len}: {self.val_accuracy:.3f}{further}"

    def save(self, step: int, compute_seconds: float) -> None:
        carry = self.carry
        save_checkpoint(self.run_dir, step, self.model, self.optimizer,
                        {"seed": self.cfg.seed, "data_position": step, "train_seconds": self.train_seconds(),
                         "compute_seconds": self.compute_before + compute_seconds,
                         "carry_batch": carry and carry.batch_size},
                        self.cfg.keep_checkpoints, extra_tensors=carry and carry.state_dict())


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
    check(budget_minutes is None or budget_minutes > 0, f"budget minutes must be positive; got {budget_minutes}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and (run_dir / "config.json").is_file():
        read_task_config(run_dir)  # refuse to write into another kind of run directory
    prepare_run_dir(run_dir, resume, lambda: _changed_settings(cfg, run_dir))
    tc = _train_config(cfg)
    torch.manual_seed(cfg.seed)
    model = LanguageModel(cfg.model_config())
    optimizer = make_optimizer(model, tc)
    step, seconds_before, compute_before = 0, 0.0, 0.0
    carry = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        trainer = load_checkpoint(ckpt, model, optimizer)
        step = trainer["step"]
        seconds_before = float(trainer.get("train_seconds", 0.0))
        compute_before = float(trainer.get("compute_seconds", 0.0))
        if cfg.state_passing and trainer.get("carry_batch"):
            carry = model.init_state(trainer["carry_batch"])
            carry.load_state_dict(load_extra_tensors(ckpt))
        log(f"resumed from {ckpt} at step {step}")
    start_step = step
    write_task_config(run_dir, cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume else None)
    n_params = model.num_parameters()
    log(f"task {cfg.task} ({cfg.options}), architecture {cfg.arch}: {', '.join(model.config.layers)}, "
        f"d_model {model.config.d_model}, {n_params:,} parameters; {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.train_len} tokens"
        + ("" if cfg.start_len is None else f" (lengths from {cfg.start_len}, doubling every {cfg.grow_every} steps, "
                                            "at the same tokens per step)"))

    run = _TaskRun(cfg, run_dir, model, optimizer, metrics, carry=carry, seconds_before=seconds_before,
                   compute_before=compute_before)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    budget = None if budget_minutes is None else budget_minutes * 60.0
    outcome = run_loop(model, optimizer, run, LoopSettings(tc, step, end, budget_seconds=budget, progress=progress,
                                                           lr_hint="task.lr or raise task.warmup", run_dir=run_dir))
    step = outcome.step
    if outcome.interrupted or outcome.out_of_budget:
        why = "interrupted" if outcome.interrupted else f"time budget of {budget_minutes:g} minutes reached"
        log(f"{why} at step {step}/{cfg.steps}; checkpoint saved. Continue with: "
            f"longctx task train --out {run_dir} --resume")
    compute_seconds = compute_before + outcome.compute_seconds
    records = read_metrics(run_dir / "metrics.jsonl")
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    # Throughput of the training steps themselves (validation and checkpoints excluded).
    tokens_per_s = tokens_seen(cfg, step) / compute_seconds if compute_seconds else (rates[-1] if rates else 0.0)
    wall = run.train_seconds() if step > start_step or not resume else seconds_before
    val_acc = run.val_accuracy
    if val_acc is None:
        vals = [r["val_accuracy"] for r in records if "val_accuracy" in r]
        val_acc = vals[-1] if vals else None
    summary = {"task": cfg.task, "arch": cfg.arch, "step": step, "steps": cfg.steps,
               "finished": step >= cfg.steps, "out_of_budget": outcome.out_of_budget, "train_seconds": wall,
               "parameters": n_params, "tokens_per_s": tokens_per_s, "val_accuracy": val_acc,
               "train_len": cfg.train_len, "batch_size": cfg.batch_size}
    write_json_atomic(run_dir / "summary.json", summary)
    plot_task_training(run_dir / "metrics.jsonl", run_dir / "training.png", chance=chance_level(cfg.task, cfg.options))
    return TaskTrainResult(step, outcome.interrupted, outcome.out_of_budget, wall, n_params, tokens_per_s, val_acc)

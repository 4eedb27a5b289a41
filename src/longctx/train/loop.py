"""The training loop that language-model runs (``longctx train``) and synthetic-task runs
(``longctx task train``) share: what differs between them comes in through ``LoopHooks``.

Each step: the learning rate of the schedule, the hooks' forward and backward, a check that
the loss is finite, gradient clipping, the optimizer step.  Then, at their cadences: a
metrics record of the steps since the last one, validation, a checkpoint.  SIGINT and
SIGTERM set a flag checked between steps, so an interrupted run saves a checkpoint of the
last finished step and returns; a second signal stops at once.  A time budget ends a run
the same way.  The step is the data position: the hooks draw the batch of step ``s`` from a
generator seeded by ``s``, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from longctx.model import ConfigError
from longctx.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from longctx.train.config import TrainConfig
from longctx.train.optim import lr_at


@dataclass
class StepOutput:
    """What one step's forward and backward gave: the mean training loss, the tokens it
    trained on, and counts the hooks sum over a metrics window (e.g. correct answers)."""

    loss: float
    tokens: int
    counts: dict[str, float] = field(default_factory=dict)


@dataclass
class Window:
    """The steps since the last metrics record."""

    steps: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    counts: dict[str, float] = field(default_factory=dict)
    last: StepOutput | None = None
    lr: float = 0.0
    grad_norm: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, out: StepOutput, lr: float, grad_norm: float) -> None:
        self.steps += 1
        self.tokens += out.tokens
        self.loss_sum += out.loss
        for name, value in out.counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + value
        self.last, self.lr, self.grad_norm = out, lr, grad_norm

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


class LoopHooks(Protocol):
    """What a kind of run does inside the shared loop."""

    def train_step(self, step: int) -> StepOutput:
        """Forward and backward of step ``step`` (0-based): gradients accumulated on the model."""

    def log(self, step: int, window: Window) -> dict[str, float]:
        """Write the metrics record of ``window`` (ending at ``step``); return what the progress bar shows."""

    def validate(self, step: int) -> str | None:
        """Validate after ``step``; return a line for the console, if any."""

    def save(self, step: int, compute_seconds: float) -> None:
        """Write a checkpoint of the state after ``step``; ``compute_seconds``: this session's
        training steps so far."""


@dataclass
class LoopSettings:
    """The cadences and limits of one session of a run."""

    schedule: TrainConfig  # the learning-rate schedule, gradient clipping and cadences
    start: int  # steps already done (resumed)
    end: int  # stop after this step (``stop_at``, else ``schedule.steps``)
    budget_seconds: float | None = None  # stop (and save) before a step would overrun this session's time
    progress: bool = True
    any_rank: Callable[[bool], bool] = bool  # sequence parallelism: all ranks stop together
    lr_hint: str = "train.lr or raise train.warmup_steps"  # what to change when the loss is not finite
    run_dir: Path | None = None  # named with the last good checkpoint when the loss is not finite


@dataclass
class LoopOutcome:
    step: int
    interrupted: bool  # a signal (Ctrl-C, SIGTERM) stopped it
    out_of_budget: bool  # the time budget ended it before ``end``
    compute_seconds: float  # the training steps themselves (validation and checkpoints excluded)


@contextlib.contextmanager
def stop_on_signal():
    """Turn SIGINT/SIGTERM into a flag checked between steps, so an interrupted run saves
    a checkpoint instead of dying mid-step.  A second signal stops at once."""
    flag = {"stop": False}
    previous = {}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers, no graceful stop
        pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def run_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, hooks: LoopHooks,
             settings: LoopSettings) -> LoopOutcome:
    """Train from step ``settings.start`` to ``settings.end``; see the module docstring."""
    tc = settings.schedule
    step, end = settings.start, settings.end
    session_start = time.perf_counter()
    compute_seconds = step_seconds = 0.0
    interrupted = out_of_budget = False
    window = Window()
    model.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not settings.progress, unit="step", dynamic_ncols=True)
    with stop_on_signal() as stop_flag:
        while step < end:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = hooks.train_step(step)
            if not math.isfinite(out.loss):
                raise FloatingPointError(f"training loss became {out.loss} at step {step + 1}; lower "
                                         f"{settings.lr_hint}{_last_good(settings.run_dir)}")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_seconds = time.perf_counter() - t0
            compute_seconds += step_seconds
            window.add(out, lr, float(grad_norm))
            bar.update(1)
            if step % tc.log_every == 0 or step == end:
                bar.set_postfix(hooks.log(step, window))
                window = Window()
            if step % tc.eval_every == 0 or step == tc.steps:
                line = hooks.validate(step)
                if line:
                    bar.write(line)
            if settings.any_rank(stop_flag["stop"]):
                interrupted = True
                break
            budget = settings.budget_seconds
            if budget is not None and step < end and time.perf_counter() - session_start + step_seconds > budget:
                out_of_budget = True
                break
            if step % tc.save_every == 0 or step == end:
                hooks.save(step, compute_seconds)
    bar.close()
    if interrupted or out_of_budget:
        hooks.save(step, compute_seconds)
    return LoopOutcome(step, interrupted, out_of_budget, compute_seconds)


def _last_good(run_dir: Path | None) -> str:
    last = latest_checkpoint(run_dir) if run_dir is not None and list_checkpoints(run_dir) else None
    return f" (last good checkpoint: {last})" if last else ""


def prepare_run_dir(run_dir: Path, resume: bool, changed_settings: Callable[[], list[str]]) -> None:
    """Refuse to overwrite a run; on resume, require a checkpoint and refuse settings that
    would change the run's course (``changed_settings()`` names them).

    A directory with a config but no checkpoint (a run that failed before its first save)
    may be started afresh.
    """
    if not resume:
        if list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        return
    if latest_checkpoint(run_dir) is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from; train without --resume")
    changed = changed_settings()
    if changed:
        raise ConfigError(f"{', '.join(changed)} differ from the settings {run_dir} was trained with, which would "
                          "change the model or its data; resume without changing them, or start a new run with "
                          "another --out")

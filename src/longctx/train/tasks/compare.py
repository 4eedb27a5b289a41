"""Comparing architectures on a task: train and evaluate each, then write the report
(``longctx.eval.report``)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from longctx.eval.report import write_report
from longctx.eval.tasks import chance_level, check_lengths, evaluate_task
from longctx.train.checkpoint import latest_checkpoint
from longctx.train.tasks.config import ARCHS, TASK_DEFAULTS, TaskConfig, apply_overrides, check_task, parse_arch
from longctx.train.tasks.mechanisms import eval_after_prompt
from longctx.validation import check
from longctx.train.tasks.trainer import load_task_run, train_task

def evaluate_run(
    run_dir: str | Path,
    lengths: list[int] | None = None,
    *,
    task: str | None = None,
    checkpoint: str | None = None,
    **eval_options,
) -> dict[str, Any]:
    """``evaluate_task`` on a task run's model (its task and options); ``lengths`` default to
    the task's standard ones; pauses or filler after each prompt as the run was trained to
    (``eval_after_prompt``).  The result also names the run, its checkpoint and architecture."""
    cfg, model, path = load_task_run(run_dir, checkpoint, task)
    lengths = list(TASK_DEFAULTS[cfg.task].eval_lengths) if lengths is None else list(lengths)
    check_lengths(cfg.task, cfg.options, lengths)
    result = evaluate_task(model, cfg, lengths, after_prompt=eval_after_prompt(cfg), **eval_options)
    result.update(run=str(run_dir), checkpoint=path.name, arch=cfg.arch, train_len=cfg.train_len)
    return result


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": load,
            "platform": platform.platform(), "torch": torch.__version__}


def compare(
    task: str,
    archs: list[str],
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
    """Train and evaluate each architecture on ``task``; write ``out_dir/report.md``,
    ``accuracy.png`` and ``results.json`` (one run directory per architecture under ``out_dir``).

    ``archs`` are names of ``ARCHS``, optionally with model overrides
    (``"mamba:ssm_state=4"``).  ``budget_minutes`` caps each architecture's training time,
    ``eval_minutes`` its evaluation time (lengths beyond it are reported "over budget").
    A run directory that already holds a run of the same settings is resumed (or reused
    when finished), so an interrupted comparison continues where it stopped.
    """
    check_task(task)
    check(bool(archs), f"no architectures given; choose from {', '.join(ARCHS)}")
    specs = [(p, *parse_arch(p)) for p in archs]
    labels = [spec[0] for spec in specs]
    check(len(set(labels)) == len(labels), f"architectures repeat: {', '.join(labels)}")
    lengths = list(TASK_DEFAULTS[task].eval_lengths) if lengths is None else list(lengths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build (and so validate) every config before the first, long, training starts.
    configs = {}
    for label, name, model_overrides, training_overrides in specs:
        values = {"task": task, "arch": name, "train_len": train_len, "steps": steps}
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
            "label": label, "arch": cfg.arch, "layers": cfg.model_config().layers, "run": str(run),
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
            "machine_start": machine_start, "machine_end": machine_info(),
            "budget_minutes": budget_minutes, "eval_minutes": eval_minutes}
    paths = write_report(out_dir, meta, rows)
    return {"meta": meta, "rows": rows, "paths": {k: str(v) for k, v in paths.items()}}

"""Training metrics: one JSON object per line, and the loss-curve plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from longctx.eval.plotting import pyplot, save_figure


class MetricsLog:
    """Append-only ``metrics.jsonl``.  On resume, lines past the resumed step are dropped
    (they came after the last checkpoint), so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (the writer was killed) is skipped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not valid JSON ({e}); fix or delete that line") from None
    return records


def plot_loss(metrics_path: Path, out_path: Path, baseline_bpb: float | None = None) -> Path | None:
    """Training loss and validation bits per byte against step, as a PNG.  Needs matplotlib
    (``pip install 'longctx[plot]'``); without it, warn and return None."""
    plt = pyplot("loss curve")
    if plt is None:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="training loss")
    if val:
        ax_bpb.plot(*zip(*val), marker="o", label="validation")
    if baseline_bpb is not None:
        ax_bpb.axhline(baseline_bpb, color="grey", linestyle="--", label="unigram baseline")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation")
    ax_bpb.legend()
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
    return save_figure(fig, out_path)

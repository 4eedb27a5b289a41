"""Reports of task comparisons: a markdown table (architectures as rows, lengths as columns), a
plot of accuracy against length (log2 axis, chance level), and per-architecture training time,
parameters and tokens/s; plus the training curve of one task run, and the depth x length
heatmap of needle tests (``plot_depth_heatmap``).

``write_report(out_dir, meta, rows)`` writes ``report.md``, ``accuracy.png`` and
``results.json``.  ``rows`` are dicts with at least ``label`` and ``accuracy``
(``{length: accuracy or status}``); ``train_seconds``, ``eval_seconds``, ``parameters``,
``train_tokens_per_s``, ``eval_tokens_per_s``, ``steps``, ``by_depth`` are shown when present.
``meta`` holds ``task``, ``lengths``, ``chance`` and optional ``train_len``, ``note``,
``options``, ``examples``, ``machine_start`` / ``machine_end`` (cpus, load average).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longctx.eval.plotting import pyplot, save_figure


def format_length(n: int) -> str:
    """``1048576`` -> ``"2^20"`` for powers of two from 1024 on, else the number."""
    n = int(n)
    if n >= 1024 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return str(n)


def format_accuracy(value: Any) -> str:
    """Percent with one decimal, or the status text ("out of memory", "over budget")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{100.0 * value:.1f}"
    return "-" if value is None else str(value)


def _get(mapping: dict, length: int):
    """A value keyed by length, whether the keys are ints or (after JSON) strings."""
    if length in mapping:
        return mapping[length]
    return mapping.get(str(length))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def accuracy_table(rows: Sequence[dict[str, Any]], lengths: Sequence[int], *, train_len: int | None = None) -> str:
    """Markdown table of accuracy (%): one row per architecture, one column per length (the
    training length marked with ``*``)."""
    header = ["architecture"] + [format_length(n) + ("*" if n == train_len else "") for n in lengths]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(lengths)) + "|"]
    for row in rows:
        cells = [format_accuracy(_get(row["accuracy"], n)) for n in lengths]
        lines.append("| " + " | ".join([str(row["label"])] + cells) + " |")
    return "\n".join(lines)


def depth_table(by_depth: dict, lengths: Sequence[int]) -> str:
    """Passkey accuracy (%) per depth (rows) and length (columns) for one model."""
    depths = sorted({float(d) for n in lengths for d in (_get(by_depth, n) or {})})
    lines = ["| depth | " + " | ".join(format_length(n) for n in lengths) + " |",
             "|---|" + "|".join(["---:"] * len(lengths)) + "|"]
    for d in depths:
        cells = []
        for n in lengths:
            cell = _get(by_depth, n) or {}
            value = cell.get(d, cell.get(str(d)))
            cells.append(format_accuracy(value))
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per architecture: layers, parameters, steps, peak learning rate, training and evaluation wall
    time, tokens/s."""
    lines = ["| architecture | layers | parameters | steps | peak lr | training time | training tokens/s | evaluation time | "
             "evaluation tokens/s (longest evaluated) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        steps = row.get("steps")
        planned = row.get("steps_planned")
        steps_text = "-" if steps is None else (f"{steps}" if planned in (None, steps) else f"{steps}/{planned}")
        if row.get("out_of_budget"):
            steps_text += " (budget)"
        rates = row.get("eval_tokens_per_s") or {}
        longest = max(rates, key=lambda k: int(k)) if rates else None
        eval_rate = "-" if longest is None else f"{rates[longest]:,.0f} (at {format_length(int(longest))})"
        params = row.get("parameters")
        layers = row.get("layers")
        lines.append("| " + " | ".join([
            str(row["label"]), ", ".join(layers) if layers else "-", "-" if params is None else f"{params:,}",
            steps_text, "-" if row.get("lr") is None else f"{row['lr']:g}", _duration(row.get("train_seconds")),
            "-" if row.get("train_tokens_per_s") is None else f"{row['train_tokens_per_s']:,.0f}",
            _duration(row.get("eval_seconds")), eval_rate,
        ]) + " |")
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[dict[str, Any]], lengths: Sequence[int], out_path, *, chance: float | None = None,
                  train_len: int | None = None, title: str | None = None) -> Path | None:
    """Accuracy against length (log2 x axis), one line per architecture; lengths with a status
    instead of an accuracy are marked at the bottom with an x.  Needs matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    marked = False
    for row in rows:
        xs, ys, missing = [], [], []
        for n in lengths:
            value = _get(row["accuracy"], n)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs.append(n)
                ys.append(100.0 * value)
            elif value is not None:
                missing.append(n)
        (line,) = ax.plot(xs, ys, marker="o", label=str(row["label"]))
        if missing:
            ax.plot(missing, [-3.0] * len(missing), linestyle="none", marker="x", color=line.get_color(),
                    label=None if marked else "x: not evaluated (over budget / out of memory)")
            marked = True
    if chance is not None:
        ax.axhline(100.0 * chance, color="grey", linestyle="--", label=f"chance ({100 * chance:.1f}%)")
    if train_len is not None:
        ax.axvline(train_len, color="grey", linestyle=":", label=f"training length ({train_len})")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-6, 104)
    ax.set(xlabel="sequence length (tokens)", ylabel="accuracy (%)", title=title or "accuracy against length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def plot_depth_heatmap(by_depth: dict, lengths: Sequence[int], depths: Sequence[float], out_path, *,
                       title: str | None = None, length_label=format_length) -> Path | None:
    """The needle-test picture: accuracy (%) by depth (rows, 0 at the top) and length
    (columns), red to green, each cell labelled; a cell with a status instead ("out of memory",
    "over budget") is grey with the status, one never run is blank.  ``by_depth`` maps length ->
    {depth: accuracy or status} (keys may be JSON strings).  Needs matplotlib."""
    plt = pyplot("heatmap")
    if plt is None:
        return None
    import numpy as np

    grid = np.full((len(depths), len(lengths)), np.nan)
    labels = [["" for _ in lengths] for _ in depths]
    for j, n in enumerate(lengths):
        cell = _get(by_depth, n) or {}
        for i, d in enumerate(depths):
            value = cell.get(d, cell.get(str(d), cell.get(str(float(d)))))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                grid[i, j] = 100.0 * value
                labels[i][j] = f"{100.0 * value:.0f}"
            elif value is not None:
                labels[i][j] = "\n".join(str(value).split(" ", 1))
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.55 * len(depths) + 1.6))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8 if np.isfinite(grid[i, j]) else 6)
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set(xlabel="prompt length (tokens)", ylabel="depth of the needle", title=title or "accuracy by depth")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return save_figure(fig, out_path)


def plot_task_training(metrics_path, out_path, *, chance: float | None = None) -> Path | None:
    """Training loss and accuracy (train batches, validation at the training length and at
    ``task.val_lengths``) against step, from a task run's metrics.jsonl.  Needs matplotlib."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    records = []
    for line in metrics_path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    train = [(r["step"], r["loss"], r["accuracy"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    if train:
        steps, loss, acc = zip(*train)
        ax_loss.plot(steps, loss)
        ax_acc.plot(steps, acc, label="training batches")
    further = sorted({n for r in records for n in r.get("val_accuracy_at", {})}, key=int)
    if val:
        ax_acc.plot(*zip(*val), marker="o", label="validation at the training length" if further else "validation")
    for n in further:  # task.val_lengths
        points = [(r["step"], r["val_accuracy_at"][n]) for r in records
                  if isinstance(r.get("val_accuracy_at", {}).get(n), float)]
        if points:
            ax_acc.plot(*zip(*points), marker=".", label=f"validation at {n}")
    if chance is not None:
        ax_acc.axhline(chance, color="grey", linestyle="--", label="chance")
    ax_loss.set(xlabel="step", ylabel="loss on asked positions (nats)", title="training loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy" if further else "accuracy at the training length",
               ylim=(-0.02, 1.02))
    ax_acc.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside the data, not on it
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    return save_figure(fig, out_path)


def _machine(m: dict | None) -> str:
    if not m:
        return "-"
    load = m.get("load_average")
    load_text = "-" if load is None else ", ".join(f"{x:.2f}" for x in load)
    return f"{m.get('cpus')} CPUs, {m.get('torch_threads')} torch threads, load average (1/5/15 min) {load_text}"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def report_markdown(meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    lengths = list(meta["lengths"])
    train_len = meta.get("train_len")
    chance = meta.get("chance")
    parts = [f"# {meta['task']}: accuracy against length", ""]
    facts = []
    if meta.get("options"):
        facts.append("task options " + ", ".join(f"{k}={v}" for k, v in meta["options"].items()))
    if train_len:
        facts.append(f"trained at length {train_len} (column marked *)")
    if meta.get("examples"):
        facts.append(f"{meta['examples']} evaluation examples per length")
    if chance is not None:
        facts.append(f"chance {100 * chance:.1f}%")
    if facts:
        parts += ["; ".join(facts) + ".", ""]
    parts += ["## Accuracy (%)", "", accuracy_table(rows, lengths, train_len=train_len), "",
              "\"out of memory\": the length does not fit the memory limit even with one example; "
              "\"over budget\": it would not finish within the evaluation time budget.", "",
              "![accuracy against length](accuracy.png)", ""]
    for row in rows:
        if row.get("by_depth"):
            parts += [f"### {row['label']}: accuracy (%) by depth of the pass key", "",
                      depth_table(row["by_depth"], lengths), ""]
    parts += ["## Runs", "", runs_table(rows), "",
              "Times are wall-clock on this machine; training time excludes evaluation.", "",
              f"Machine at start: {_machine(meta.get('machine_start'))}.  ",
              f"Machine at end: {_machine(meta.get('machine_end'))}.", ""]
    if meta.get("budget_minutes") or meta.get("eval_minutes"):
        parts += [f"Budgets: training {meta.get('budget_minutes') or 'none'} min per architecture, evaluation "
                  f"{meta.get('eval_minutes') or 'none'} min per architecture.", ""]
    return "\n".join(parts)


def write_report(out_dir, meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write ``report.md``, ``accuracy.png`` (when matplotlib is installed) and
    ``results.json`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    png = plot_accuracy(rows, meta["lengths"], out_dir / "accuracy.png", chance=meta.get("chance"),
                        train_len=meta.get("train_len"), title=f"{meta['task']}: accuracy against length")
    if png is not None:
        paths["plot"] = png
    report = out_dir / "report.md"
    report.write_text(report_markdown(meta, rows))
    paths["report"] = report
    results = out_dir / "results.json"
    tmp = results.with_name(".results.json.tmp")
    tmp.write_text(json.dumps(_jsonable({"meta": meta, "runs": list(rows)}), indent=2))
    tmp.replace(results)
    paths["results"] = results
    return paths


__all__ = ["accuracy_table", "depth_table", "format_accuracy", "format_length", "plot_accuracy",
           "plot_depth_heatmap", "plot_task_training", "report_markdown", "runs_table", "write_report"]

"""Long-context retrieval of a pretrained model on the text tasks (``longctx.data.text_tasks``):
accuracy by task, length, depth and cache policy, with the time and memory of each cell.

For every task x length x cache policy (a *cell*), ``examples`` prompts per depth are
generated (``make_example``, seeds from ``seed``, the same for every policy), rendered
through the tokenizer's chat template (the task's text as the user's message, the answer
prefix starting the assistant's reply) and built to exactly ``length`` tokens.  Each is
prefilled, then answered greedily for up to ``MAX_NEW_TOKENS[task]`` tokens (stopping at
eos) and scored by RULER's ``string_match_all`` (``score``).

Cache policies are data: ``Policy(cache, options)`` is passed to ``model.init_state(batch,
max_len, cache=cache, **options)``, so any policy the model's attention layers know
(``dense``, ``window``, ``sinks``, and those added later) plugs in.  ``parse_policies``
reads ``"dense,dense:rope=yarn,sinks:sinks=4:window=1020"``: ``rope`` (``dynamic``,
``yarn``, ``linear``) and ``rope_factor`` are not cache options but rebuild the model with
that RoPE scaling from the trained context (``config.context_len``) on: ``yarn`` and
``linear`` with factor ``length / context_len`` (no change up to the trained length),
``dynamic`` with factor 2 (transformers' dynamic NTK; it scales only beyond the trained
length, following the sequence length at each call).

Prefill (``longctx.generation.prefill``): the prompt but its last token goes through the
model in pieces of ``chunk`` tokens (default: 32768), and never more than a bounded cache
has room for before it evicts: the sink and window caches take pieces of at most
``capacity - seq_len`` tokens, then one token at a time.  ``batch`` examples of a cell
run together (all prompts of a cell have the same length), which amortises the
one-token steps of bounded caches.

Budgets, per cell: before a cell runs, the memory it adds (its caches at their largest,
the activations of a prefill piece) is estimated; above ``max_memory`` the cell is
``"out of memory"`` (so is an allocation failure while it runs).  Its time is estimated
from the policy's previous cell by FLOPs; a cell that would take more than
``budget_seconds``, or overruns it while running, is ``"over budget"``, and so are the
policy's longer lengths of the task.

Measured per cell: the seconds of model work per example (prefill and answer) and the peak
resident memory of the process, which includes the model's weights.  The peak is the
kernel's high-water mark (``VmHWM``) reset before each cell through ``/proc/self/clear_refs``
(Linux >= 4.0); where that is not possible it is ``getrusage``'s ``ru_maxrss``, the
process's peak since it started (``rss_method`` in the results says which).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longctx.cache import check_policy
from longctx.data.text_tasks import MAX_NEW_TOKENS, TEXT_TASKS, build_prompt, make_example, score, task_options
from longctx.eval.report import plot_depth_heatmap
from longctx.eval.tasks import OUT_OF_MEMORY, OVER_BUDGET, default_max_memory
from longctx.generation.chat import render_chat
from longctx.generation.generate import prefill, stream
from longctx.model.config import ConfigError

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_CHUNK = 32768
ROPE_TYPES = ("dynamic", "yarn", "linear")
DYNAMIC_FACTOR = 2.0


@dataclass(frozen=True)
class Policy:
    """A cache policy: ``model.init_state(..., cache=cache, **options)``, optionally on the
    model rebuilt with RoPE scaling ``rope`` (module docstring); ``label`` names it."""

    label: str
    cache: str
    options: dict[str, Any] = field(default_factory=dict)
    rope: str | None = None
    rope_factor: float | None = None


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_policies(text: str) -> list[Policy]:
    """``"dense,sinks:sinks=4:window=1020,dense:rope=yarn"`` -> policies: a cache name, then
    ``:key=value`` options for ``init_state`` (``rope`` and ``rope_factor`` excepted)."""
    policies = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        name, *pairs = spec.split(":")
        check_policy(name)
        options: dict[str, Any] = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise ConfigError(f"cannot read {pair!r} in cache policy {spec!r}; write NAME:key=value, "
                                  "e.g. sinks:sinks=4:window=1020")
            options[key.strip()] = _value(value.strip())
        rope, factor = options.pop("rope", None), options.pop("rope_factor", None)
        if rope is not None and rope not in ROPE_TYPES:
            raise ConfigError(f"rope={rope!r} in {spec!r}: choose one of {', '.join(ROPE_TYPES)}")
        if factor is not None and (rope is None or not isinstance(factor, (int, float)) or factor < 1):
            raise ConfigError(f"rope_factor in {spec!r} needs rope=... and a number >= 1; got {factor!r}")
        policies.append(Policy(spec, name, options, rope, None if factor is None else float(factor)))
    if not policies:
        raise ConfigError("no cache policy given; e.g. --cache dense,sinks")
    labels = [p.label for p in policies]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"cache policies repeat: {', '.join(labels)}")
    return policies


def policy_model(model, policy: Policy, length: int):
    """``model``, or for a policy with ``rope`` the same weights in a model whose RoPE is scaled
    for ``length`` tokens (built on the meta device, the weights shared, not copied)."""
    if policy.rope is None:
        return model
    original = model.config.context_len
    if original is None:
        raise ConfigError(f"{policy.label}: RoPE scaling needs the model's trained context (model.context_len), "
                          "which this model does not record")
    factor = policy.rope_factor or (DYNAMIC_FACTOR if policy.rope == "dynamic" else max(1.0, length / original))
    scaling = {"rope_type": policy.rope, "factor": factor, "original_max_position_embeddings": original}
    config = type(model.config).from_dict({**model.config.to_dict(), "rope_scaling": scaling})
    with torch.device("meta"):
        scaled = type(model)(config)
    try:
        scaled.load_state_dict(model.state_dict(), assign=True)
    except RuntimeError as e:
        raise ConfigError(f"{policy.label}: a RoPE-scaled copy needs the model's plain weights (not quantized); "
                          f"{str(e).splitlines()[0]}") from None
    return scaled.eval()


# ---------------------------------------------------------------------------------------
# Running one batch of prompts


class _OverBudget(Exception):
    pass


@torch.no_grad()
def answer_batch(model, prompts: list[list[int]], policy: Policy, *, eos_id: int | None, max_new_tokens: int,
                 chunk: int = DEFAULT_CHUNK, deadline: float | None = None) -> list[list[int]]:
    """Greedy answers (token ids, eos excluded) to equally long ``prompts`` under ``policy``:
    the prompts but their last token prefilled in pieces of ``chunk`` (``prefill``), then up
    to ``max_new_tokens`` tokens each."""
    ids = torch.tensor(prompts, dtype=torch.long)
    batch, length = ids.shape
    state = model.init_state(batch, length + max_new_tokens, cache=policy.cache, **policy.options)
    for first in range(0, length - 1, chunk):
        if deadline is not None and time.perf_counter() > deadline:
            raise _OverBudget
        prefill(model, ids[:, first : min(first + chunk, length - 1)], state)
    new = []
    for token in stream(model, ids[:, -1:], max_new_tokens, temperature=0.0,
                        stop=[] if eos_id is None else [eos_id], state=state):
        new.append(token)
        if deadline is not None and time.perf_counter() > deadline:
            raise _OverBudget
    rows = torch.stack(new, 1).tolist() if new else [[] for _ in prompts]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


# ---------------------------------------------------------------------------------------
# Memory, time and resident memory


def _held_and_span(model, policy: Policy, length: int) -> tuple[int, int]:
    """Tokens a layer's cache holds in RAM at most, and tokens one query attends to, for a
    prompt of ``length`` tokens under ``policy``: a sink or window cache allocates twice its
    capacity and attends to it; a recall cache attends to ``span`` tokens and holds all of
    them unless its blocks are memory-mapped (``memory_dir``); dense holds and reads all."""
    state = model.init_state(1, length, cache=policy.cache, **policy.options)  # allocates lazily
    layers = [s for s in state.layers if hasattr(s, "capacity") or hasattr(s, "span")]
    if not layers:
        return length, length
    s = layers[0]
    if hasattr(s, "capacity"):
        return min(2 * s.capacity, length), min(s.capacity, length)
    span = min(s.span, length)
    return (2 * span if s.memory_dir is not None else length), span


def memory_estimate(model, policy: Policy, batch: int, length: int, chunk: int, new: int) -> int:
    """Bytes a cell adds: its caches at their largest (``_held_and_span``) and the activations
    of one prefill piece."""
    c = model.config
    layers = sum(1 for name in c.layers if name in ("attention", "dilated"))
    held, span = _held_and_span(model, policy, length + new)
    cache = batch * held * layers * 2 * c.n_kv_heads * c.head_dim * 4
    piece = min(chunk, length, span)
    width = 12 * c.d_model + 4 * c.n_heads * c.head_dim + 3 * c.mlp_hidden
    return int(cache + 4 * batch * piece * width + 64 * 2**20)


def _work(model, policy: Policy, length: int) -> float:
    """FLOPs of one example (for scaling measured times between lengths)."""
    return model.flops_per_token(_held_and_span(model, policy, length)[1], backward=False) * length


def _reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS mark; returns how the peak will be measured."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM reset per cell (/proc/self/clear_refs)"
    except OSError:
        return "ru_maxrss (the process's peak since it started)"


def _rss(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    peak = _rss("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or any(s in text for s in ("alloc", "out of memory", "not enough memory"))


# ---------------------------------------------------------------------------------------
# The evaluation


def example_seed(seed: int, task: str, length: int, depth_index: int, index: int) -> int:
    """The generator seed of one example: the same for every policy, batch size and run."""
    digest = hashlib.sha256(f"{seed}/{task}/{length}/{depth_index}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def chat_wrap(tokenizer) -> Callable[[str], str] | None:
    """The tokenizer's chat template as a function of the user's message (None without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)
    return lambda user: render_chat(template, [{"role": "user", "content": user}], add_generation_prompt=True,
                                    bos_token=bos, eos_token=eos)


def evaluate_retrieval(
    model,
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    policies: Sequence[Policy],
    *,
    depths: Sequence[float] = DEPTHS,
    examples: int = 5,
    seed: int = 0,
    batch: int = 1,
    chunk: int = DEFAULT_CHUNK,
    task_opts: dict[str, dict] | None = None,
    max_new_tokens: int | None = None,
    budget_seconds: float | None = None,
    max_memory: int | None = None,
    out_dir: str | Path | None = None,
    model_name: str = "model",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on each text task, length, depth and policy (module docstring);
    ``examples`` per depth.  With ``out_dir``, results are written there after every cell
    (``write_results``), and cells measured before with the same settings are taken from its
    ``results.json`` instead of run again; the lengths, policies and tasks measured before
    with those settings stay in the results, so runs add to one table.  Returns the results (``write_results``' input)."""
    _check_arguments(tasks, lengths, depths, examples, batch, chunk, budget_seconds, max_new_tokens)
    say = log or (lambda message: None)
    max_memory = default_max_memory() if max_memory is None else int(max_memory)
    wrap = chat_wrap(tokenizer)
    weights = model.fingerprint()["weights"]
    previous = _previous(out_dir)
    results: dict[str, Any] = {
        "model": model_name, "weights": weights, "seed": seed, "depths": list(depths), "examples_per_depth": examples,
        "batch": batch, "chunk": chunk, "budget_seconds": budget_seconds, "max_memory": max_memory,
        "chat_template": wrap is not None, "rss_method": _reset_peak_rss(), "tasks": {},
    }
    shared = {"weights": weights, "seed": seed, "depths": list(depths), "examples_per_depth": examples,
              "chat_template": wrap is not None}
    for task, old in previous.items():  # other tasks measured with the same settings stay in the report
        if task not in tasks and all(old.get("settings", {}).get(k) == v for k, v in shared.items()):
            results["tasks"][task] = old
    for task in tasks:
        opts = task_options(task, (task_opts or {}).get(task))
        new = max_new_tokens or MAX_NEW_TOKENS[task]
        settings = {"weights": weights, "seed": seed, "depths": list(depths), "examples_per_depth": examples,
                    "options": opts, "max_new_tokens": new, "chat_template": wrap is not None}
        entry = {"options": opts, "max_new_tokens": new, "lengths": list(lengths),
                 "policies": [p.label for p in policies], "cells": {p.label: {} for p in policies},
                 "settings": settings}
        results["tasks"][task] = entry
        old = previous.get(task, {})
        reuse = old.get("settings") == settings
        if reuse:  # one table across runs: lengths and policies measured before stay in it
            entry["lengths"] = sorted(set(old["lengths"]) | set(lengths))
            entry["policies"] = old["policies"] + [p.label for p in policies if p.label not in old["policies"]]
            entry["cells"] = {label: dict(old["cells"].get(label, {})) for label in entry["policies"]}
        stopped: dict[str, str] = {}
        last: dict[str, tuple[int, float]] = {}  # policy -> (length, seconds per example)
        for length in lengths:
            prompts = None
            for policy in policies:
                cached = old.get("cells", {}).get(policy.label, {}).get(str(length)) if reuse else None
                if cached is not None and isinstance(cached.get("accuracy"), float):
                    cell = cached
                else:
                    if prompts is None and policy.label not in stopped:
                        prompts = _prompts(task, opts, length, depths, examples, seed, tokenizer, wrap)
                    cell = _run_cell(model, policy, task, length, prompts, depths, new, tokenizer,
                                     batch=batch, chunk=chunk, budget_seconds=budget_seconds, max_memory=max_memory,
                                     stopped=stopped.get(policy.label), last=last.get(policy.label))
                if cell.get("seconds_per_example") is not None:
                    last[policy.label] = (length, cell["seconds_per_example"])
                if cell["accuracy"] == OVER_BUDGET:
                    stopped[policy.label] = OVER_BUDGET
                entry["cells"][policy.label][str(length)] = cell
                say(_cell_line(task, length, policy.label, cell) + (" (from results.json)" if cell is cached else ""))
                if out_dir is not None:
                    write_results(out_dir, results)
    return results


def _check_arguments(tasks, lengths, depths, examples, batch, chunk, budget_seconds, max_new_tokens) -> None:
    unknown = [t for t in tasks if t not in TEXT_TASKS]
    if not tasks or unknown:
        raise ConfigError(f"unknown text task(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(TEXT_TASKS)}")
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths) or list(lengths) != sorted(set(lengths)):
        raise ConfigError(f"lengths must be increasing positive integers; got {list(lengths)}")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"depths must be numbers in [0, 1]; got {list(depths)}")
    for name, value in (("examples", examples), ("batch", batch), ("chunk", chunk)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if budget_seconds is not None and budget_seconds <= 0:
        raise ConfigError(f"the time budget must be positive; got {budget_seconds}")


def _previous(out_dir) -> dict:
    path = None if out_dir is None else Path(out_dir) / "results.json"
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("tasks", {})
    except (json.JSONDecodeError, AttributeError):
        return {}


def _prompts(task, opts, length, depths, examples, seed, tokenizer, wrap) -> list[tuple[float, Any, Any]]:
    """``(depth, example, prompt)`` of a cell, depth by depth."""
    out = []
    for di, depth in enumerate(depths):
        for i in range(examples):
            ex = make_example(task, depth, example_seed(seed, task, length, di, i), **opts)
            out.append((depth, ex, build_prompt(ex, tokenizer, length, wrap=wrap)))
    return out


def _run_cell(model, policy, task, length, prompts, depths, new, tokenizer, *, batch, chunk, budget_seconds,
              max_memory, stopped, last) -> dict[str, Any]:
    def status(text: str, note: str) -> dict[str, Any]:
        return {"accuracy": text, "by_depth": {str(d): text for d in depths}, "note": note}

    if stopped is not None:
        return status(stopped, "a shorter length of this policy was already over budget")
    b = min(batch, len(prompts))
    need = memory_estimate(model, policy, b, length, chunk, new)
    if need > max_memory:
        return status(OUT_OF_MEMORY, f"needs about {need / 2**30:.1f} GiB, limit {max_memory / 2**30:.1f} GiB")
    m = policy_model(model, policy, length)
    if budget_seconds is not None and last is not None:
        estimate = last[1] * _work(model, policy, length) / _work(model, policy, last[0]) * len(prompts)
        if estimate > budget_seconds:
            return status(OVER_BUDGET, f"about {estimate:,.0f} s needed, budget {budget_seconds:,.0f} s")
    gc.collect()
    _reset_peak_rss()
    rss_before = _rss("VmRSS")
    t0 = time.perf_counter()
    deadline = None if budget_seconds is None else t0 + budget_seconds
    answers = []
    try:
        for first in range(0, len(prompts), b):
            group = prompts[first : first + b]
            answers += answer_batch(m, [p.ids for _, _, p in group], policy, eos_id=tokenizer.eos_id,
                                    max_new_tokens=new, chunk=chunk, deadline=deadline)
    except _OverBudget:
        return status(OVER_BUDGET, f"stopped after {budget_seconds:,.0f} s")
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        return status(OUT_OF_MEMORY, str(e).splitlines()[0][:200])
    seconds = time.perf_counter() - t0
    rows = []
    for (depth, ex, _), ids in zip(prompts, answers):
        text = tokenizer.decode(ids)
        rows.append({"depth": depth, "expected": list(ex.answers), "answer": text, "score": score(text, ex.answers)})
    by_depth = {str(d): sum(r["score"] for r in rows if r["depth"] == d) / sum(r["depth"] == d for r in rows)
                for d in depths}
    return {"accuracy": sum(r["score"] for r in rows) / len(rows), "by_depth": by_depth, "examples": len(rows),
            "seconds": seconds, "seconds_per_example": seconds / len(rows), "peak_rss": _peak_rss(),
            "rss_before": rss_before, "batch": b, "answers": rows}


def _cell_line(task: str, length: int, label: str, cell: dict) -> str:
    acc = cell["accuracy"]
    if not isinstance(acc, float):
        return f"{task} {length} {label}: {acc} ({cell.get('note', '')})"
    return (f"{task} {length} {label}: accuracy {100 * acc:.1f}% ({cell['examples']} examples, "
            f"{cell['seconds_per_example']:.1f} s each, peak RSS {cell['peak_rss'] / 2**30:.2f} GiB)")


# ---------------------------------------------------------------------------------------
# Report


def format_tokens(n: int) -> str:
    """``1024`` -> ``"1K"``, ``1048576`` -> ``"1M"``, else the number."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _percent(value) -> str:
    return f"{100 * value:.0f}" if isinstance(value, float) else str(value)


def results_markdown(results: dict[str, Any]) -> str:
    """The report: per task, accuracy (%) by length and policy, seconds per example and peak
    resident memory per cell, and accuracy by depth per policy (with its heatmap)."""
    parts = [f"# Retrieval: {results['model']}", "",
             f"{results['examples_per_depth']} examples per depth and length, depths "
             f"{', '.join(f'{d:g}' for d in results['depths'])}, seed {results['seed']}, chat template "
             f"{'yes' if results['chat_template'] else 'no'}; peak resident memory: {results['rss_method']}; it "
             "includes the model's weights.", ""]
    for task, entry in results["tasks"].items():
        lengths, cells = entry["lengths"], entry["cells"]
        header = "| cache | " + " | ".join(format_tokens(n) for n in lengths) + " |"
        rule = "|---|" + "|".join(["---:"] * len(lengths)) + "|"
        opts = ", ".join(f"{k}={v}" for k, v in entry["options"].items())
        parts += [f"## {task}", "", f"Options {opts}; answers of up to {entry['max_new_tokens']} tokens.", "",
                  "Accuracy (%):", "", header, rule]
        for label in entry["policies"]:
            row = [_percent(cells[label].get(str(n), {}).get("accuracy", "-")) for n in lengths]
            parts.append(f"| {label} | " + " | ".join(row) + " |")
        parts += ["", "Seconds per example / peak resident memory (GiB):", "", header, rule]
        for label in entry["policies"]:
            row = []
            for n in lengths:
                c = cells[label].get(str(n), {})
                row.append("-" if c.get("seconds_per_example") is None else
                           f"{c['seconds_per_example']:.1f} s / {c['peak_rss'] / 2**30:.2f}")
            parts.append(f"| {label} | " + " | ".join(row) + " |")
        for label in entry["policies"]:
            parts += ["", f"Accuracy (%) by depth, {label}:", "", "| depth | " + header[len("| cache | "):], rule]
            for d in results["depths"]:
                row = [_percent(cells[label].get(str(n), {}).get("by_depth", {}).get(str(d), "-")) for n in lengths]
                parts.append(f"| {d:g} | " + " | ".join(row) + " |")
            parts += ["", f"![{task}, {label}]({heatmap_name(task, label)})"]
        parts.append("")
    return "\n".join(parts)


def heatmap_name(task: str, label: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return f"heatmap_{task}_{safe}.png"


def write_results(out_dir, results: dict[str, Any]) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and a depth x length heatmap per task and policy
    (``heatmap_TASK_POLICY.png``, with matplotlib) into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md"}
    for name, text in (("results", json.dumps(results, indent=1)), ("report", results_markdown(results))):
        tmp = paths[name].with_name(f".{paths[name].name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[name])
    for task, entry in results["tasks"].items():
        for label in entry["policies"]:
            by_depth = {int(n): c.get("by_depth", {}) for n, c in entry["cells"][label].items()}
            png = plot_depth_heatmap(by_depth, entry["lengths"], results["depths"], out / heatmap_name(task, label),
                                     title=f"{results['model']}: {task}, cache {label}", length_label=format_tokens)
            if png is not None:
                paths[f"heatmap {task} {label}"] = png
    return paths


__all__ = ["DEPTHS", "Policy", "answer_batch", "chat_wrap", "evaluate_retrieval", "example_seed", "format_tokens",
           "heatmap_name", "memory_estimate", "parse_policies", "policy_model", "results_markdown", "write_results"]

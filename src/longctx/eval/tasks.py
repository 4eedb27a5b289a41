"""Accuracy of a model on the synthetic long-context tasks at many lengths, each by its
cheapest exact path, with memory and time limits reported instead of crashes.

Accuracy is the fraction of asked positions (``targets != IGNORE``) where the model's
argmax is the target: one per example for induction heads, ``n_tokens`` for selective
copying, ``pairs`` for MQAR, ``digits`` for passkey, ``digits + 1`` for addition.

How a length is evaluated (``predict_asked``): the examples run through the model in
chunks of ``chunk`` tokens with a state (``LanguageModel.init_state``), which gives exactly
the logits of one full forward pass:

- state-space layers carry their recurrent state: memory O(chunk) whatever the length,
  compute O(length);
- attention layers keep a KV cache (chunked prefill): memory O(length) for the cache,
  compute O(length^2) for full attention; dilated (LongNet) layers attend to their sparse
  patterns, so compute stays about linear.

Before a length runs, its memory (cache, chunk activations, the examples) is estimated;
the batch shrinks to fit ``max_memory`` and a length that does not fit with one example is
reported ``"out of memory"`` (an allocation failure while running is reported the same
way).  Its time is estimated from the FLOPs of the length and the speed measured so far;
a length that would not finish within ``budget_seconds`` (or that overruns it while
running) is reported ``"over budget"``, and so are the longer ones after it.

``task_config`` is anything with ``task`` and ``options`` attributes (a
``longctx.train.tasks.TaskConfig``), or a task name (default options).  ``after_prompt =
(token, count)`` inserts ``count`` tokens (pauses, or filler) after each example's prompt,
before its first asked position (``longctx.data.pause.pauses_after_prompt``); lengths
count the task's tokens without them.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from longctx.data.pause import pauses_after_prompt
from longctx.data.synthetic import IGNORE, TASKS, addition_min_length, make_batch, passkey_min_length
from longctx.layers.attention import Attention
from longctx.layers.dilated import DilatedAttention
from longctx.model.config import ConfigError

OUT_OF_MEMORY = "out of memory"
OVER_BUDGET = "over budget"
EVAL_SEED_BASE = 1 << 50  # evaluation seeds never meet training seeds (below 2^41)
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_CHUNK = 4096


def task_options(task: str) -> list[str]:
    """The options a task's generator takes (besides ``seed``)."""
    params = inspect.signature(TASKS[task]).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "seed"]


def _options_with_defaults(task: str, options: dict[str, Any]) -> dict[str, Any]:
    defaults = {p.name: p.default for p in inspect.signature(TASKS[task]).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name != "seed"}
    return {**defaults, **options}


def task_min_length(task: str, options: dict[str, Any]) -> int:
    """The shortest input the task's generator can produce with these options."""
    o = _options_with_defaults(task, options)
    if task == "induction":
        return 3
    if task == "selective_copying":
        return 2 * int(o["n_tokens"])
    if task == "mqar":
        return 3 * int(o["pairs"])
    if task == "passkey":
        return passkey_min_length(int(o["digits"]))
    if task == "addition":
        return addition_min_length(int(o["digits"]))
    raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def chance_level(task: str, options: dict[str, Any]) -> float:
    """Accuracy of guessing uniformly among the answers the task can ask."""
    o = _options_with_defaults(task, options)
    if task == "induction":
        return 1.0 / (int(o["vocab"]) - 1)  # values are 0 .. vocab - 2
    if task == "selective_copying":
        return 1.0 / (int(o["vocab"]) - 2)  # data tokens are 1 .. vocab - 2
    if task == "mqar":
        return 2.0 / int(o["vocab"])  # values are vocab/2 .. vocab - 1
    if task in ("passkey", "addition"):
        return 0.1  # a digit
    raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def check_lengths(task: str, options: dict[str, Any], lengths: Sequence[int]) -> list[int]:
    """The lengths, checked: positive integers the task can produce (an error names the
    shortest possible length)."""
    if not lengths:
        raise ConfigError("no lengths given")
    bad = [x for x in lengths if not isinstance(x, int) or isinstance(x, bool) or x < 1]
    if bad:
        raise ConfigError(f"lengths must be positive integers; got {bad}")
    shortest = task_min_length(task, options)
    short = [x for x in lengths if x < shortest]
    if short:
        raise ConfigError(f"task {task!r} with options {options} cannot produce length(s) "
                          f"{', '.join(map(str, short))}: the shortest example has {shortest} tokens")
    return list(lengths)


def parse_lengths(text: str) -> list[int]:
    """``"256,512,1024"``; ``"256,512,...,1048576"`` (``...`` continues the progression of
    the two values before it up to the one after it: doubling here); ``2^16`` and ``64k``
    (x1024) forms are accepted."""

    def one(s: str) -> int:
        s = s.strip().lower().replace("**", "^")
        try:
            if "^" in s:
                base, exp = s.split("^")
                return int(base) ** int(exp)
            if s.endswith("k"):
                return int(s[:-1]) * 1024
            if s.endswith("m"):
                return int(s[:-1]) * 1024 * 1024
            return int(s)
        except ValueError:
            raise ConfigError(f"cannot read length {s!r}: use integers such as 256, 2^16 or 64k") from None

    parts = [p for p in (x.strip() for x in text.split(",")) if p]
    out: list[int] = []
    for i, p in enumerate(parts):
        if p != "...":
            out.append(one(p))
            continue
        if len(out) < 2 or i + 1 >= len(parts) or parts[i + 1] == "...":
            raise ConfigError(f"'...' in {text!r} needs two lengths before it and one after (256,512,...,65536)")
        a, b, end = out[-2], out[-1], one(parts[i + 1])
        if b % a == 0 and b // a >= 2:
            while out[-1] * (b // a) < end:
                out.append(out[-1] * (b // a))
        elif b > a:
            while out[-1] + (b - a) < end:
                out.append(out[-1] + (b - a))
        else:
            raise ConfigError(f"'...' in {text!r} needs increasing lengths before it")
    if not out:
        raise ConfigError("no lengths given")
    if sorted(set(out)) != out:
        raise ConfigError(f"lengths must increase without repeats; got {out}")
    return out


def _task_and_options(task_config) -> tuple[str, dict[str, Any]]:
    if isinstance(task_config, str):
        task, options = task_config, {}
    else:
        task, options = task_config.task, dict(getattr(task_config, "options", {}) or {})
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    options.pop("depth", None)
    return task, options


def example_seed(seed: int, length: int, depth_index: int, index: int) -> int:
    """The generator seed of evaluation example ``index``: the same examples whatever the
    batch size the memory limit chose."""
    digest = hashlib.sha256(f"{seed}/{length}/{depth_index}/{index}".encode()).digest()
    return EVAL_SEED_BASE + int.from_bytes(digest[:6], "little")


def make_examples(task: str, options: dict[str, Any], length: int, indices: range, *, seed: int = 0,
                  depth: float | None = None, depth_index: int = 0, after_prompt: tuple[int, int] | None = None):
    """``(inputs, targets)`` of evaluation examples ``indices`` at ``length``, one generator
    call each (so example ``i`` is the same in any batch); ``after_prompt``: see the module
    docstring."""
    opts = dict(options)
    if depth is not None:
        opts["depth"] = depth
    pairs = [make_batch(task, 1, length, seed=example_seed(seed, length, depth_index, i), **opts) for i in indices]
    inputs, targets = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if after_prompt is not None:
        inputs, targets = pauses_after_prompt(inputs, targets, *after_prompt)
    return inputs, targets


# ---------------------------------------------------------------------------------------
# The exact chunked path


class _OverBudget(Exception):
    pass


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("alloc" in text or "out of memory" in text or "not enough memory" in text)


@torch.inference_mode()
def predict_asked(model, inputs: torch.Tensor, targets: torch.Tensor, *, chunk: int = DEFAULT_CHUNK,
                  deadline: float | None = None) -> torch.Tensor:
    """Logits ``(n_asked, vocab)`` at the asked positions (row-major order of
    ``targets != IGNORE``), from chunks of ``chunk`` tokens carrying the model's state:
    the same logits as ``model(inputs)[targets != IGNORE]``, in memory O(chunk) for
    state-space layers (plus the KV cache of attention layers).  ``deadline``
    (``time.perf_counter()`` value) aborts between chunks."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    batch, length = inputs.shape
    device = next(model.parameters()).device
    state = model.init_state(batch, max_len=length)
    picked = []
    rows = []
    for start in range(0, length, chunk):
        if deadline is not None and time.perf_counter() > deadline:
            raise _OverBudget
        stop = min(start + chunk, length)
        logits = model(inputs[:, start:stop].to(device), state)
        asked = targets[:, start:stop] != IGNORE
        if asked.any():
            b, t = asked.nonzero(as_tuple=True)
            picked.append(logits[b, t].float().cpu())
            rows.append(b * length + t + start)
    if not picked:
        return torch.empty(0, model.config.vocab_size)
    logits, order = torch.cat(picked), torch.cat(rows).argsort()
    return logits[order]


# ---------------------------------------------------------------------------------------
# Cost and memory estimates


def _layer_kinds(model) -> list[str]:
    kinds = []
    for block in model.blocks:
        m = block.mixer
        if isinstance(m, DilatedAttention):
            kinds.append("dilated")
        else:
            kinds.append("attention" if isinstance(m, Attention) else "ssm")
    return kinds


def memory_estimate(model, batch: int, length: int, chunk: int) -> int:
    """Bytes needed to evaluate ``batch`` examples of ``length`` tokens in chunks of ``chunk``:
    attention KV caches (twice, for the copy a chunk's attention may take), activations of a
    chunk, the examples and their generator's temporaries."""
    c = model.config
    kinds = _layer_kinds(model)
    kv = 2 * c.n_kv_heads * c.head_dim * 4  # k and v, fp32
    cache = 0
    for kind in kinds:
        if kind == "attention":
            held = length if c.attn_window is None else min(length, c.attn_window + chunk)
            if c.memory_tokens:  # the cache holds one segment
                held = min(held, c.memory_segment + 2 * c.memory_tokens)
            cache += 2 * batch * held * kv
        elif kind == "dilated":
            cache += 2 * batch * min(length, max(c.dilated_segments) + chunk) * kv
    d_inner = c.ssm_expand * c.d_model
    step = min(chunk, length)
    width = 16 * c.d_model + 12 * d_inner + 3 * c.mlp_hidden + 2 * c.vocab_size + 4 * c.n_heads * c.head_dim
    if "dilated" in kinds:
        width += 4 * len(c.dilated_segments) * c.n_heads * c.head_dim
    activations = 4 * batch * step * width
    data = 48 * batch * length
    return int(cache + activations + data + 64 * 2**20)


def default_max_memory() -> int:
    """Half of the memory available now, at most 8 GiB (other processes share the machine)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 * 2**30
    return int(min(available // 2, 8 * 2**30))


# ---------------------------------------------------------------------------------------
# The evaluation


def evaluate_task(
    model,
    task_config,
    lengths: Sequence[int],
    *,
    examples: int = 100,
    batch: int = 8,
    seed: int = 0,
    depths: Sequence[float] | None = None,
    chunk: int | None = None,
    budget_seconds: float | None = None,
    max_memory: int | None = None,
    log: Callable[[str], None] | None = None,
    after_prompt: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on the task at each length (see the module docstring).

    Returns ``{"task", "options", "chance", "examples", "accuracy": {length: accuracy or
    "out of memory" or "over budget"}, "seconds": {length: s}, "tokens_per_s": {length: t},
    "batch": {length: b}}``, plus for passkey ``"by_depth": {length: {depth: ...}}``
    (``examples`` split over the ``depths``; the length's accuracy is their mean).
    """
    task, options = _task_and_options(task_config)
    lengths = sorted(check_lengths(task, options, list(lengths)))
    if examples < 1 or batch < 1:
        raise ConfigError(f"examples and batch must be >= 1; got {examples}, {batch}")
    if budget_seconds is not None and budget_seconds <= 0:
        raise ConfigError(f"the time budget must be positive; got {budget_seconds}")
    cells, per_cell = _cells(task, examples, depths)
    max_memory = default_max_memory() if max_memory is None else int(max_memory)
    chunk_len = DEFAULT_CHUNK if chunk is None else int(chunk)
    if chunk_len < 1:
        raise ConfigError(f"chunk must be >= 1; got {chunk}")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    deadline = None if budget_seconds is None else start + budget_seconds
    say = log or (lambda message: None)
    accuracy: dict[int, Any] = {}
    by_depth: dict[int, dict[float, Any]] = {}
    seconds: dict[int, float] = {}
    tokens_per_s: dict[int, float] = {}
    batches: dict[int, int] = {}
    rate = None  # measured FLOP/s of the model on this machine
    stop_reason = None
    try:
        for length in lengths:
            n_total = per_cell * len(cells)
            step = min(chunk_len, length)
            b = min(batch, per_cell)
            while b > 1 and memory_estimate(model, b, length, step) > max_memory:
                b //= 2
            batches[length] = b
            if stop_reason is None and memory_estimate(model, b, length, step) > max_memory:
                status = OUT_OF_MEMORY
                need = memory_estimate(model, 1, length, step)
                say(f"length {length}: out of memory (needs about {need / 2**30:.1f} GiB for one example; "
                    f"limit {max_memory / 2**30:.1f} GiB)")
                _set_all(accuracy, by_depth, length, cells, status, task)
                continue
            if stop_reason is None and deadline is not None:
                if rate is None:
                    rate = _probe_rate(model, task, options, length, min(b, 2), step, seed, after_prompt)
                need = model.flops_per_token(length, backward=False) * length * n_total / rate
                # The speed measured at shorter lengths is pessimistic (more overhead per token), so
                # skip only what is clearly out of reach; the check while running catches the rest.
                if time.perf_counter() + 0.5 * need > deadline:
                    stop_reason = OVER_BUDGET
                    say(f"length {length}: over budget (about {need:,.0f} s needed, "
                        f"{max(0.0, deadline - time.perf_counter()):,.0f} s left)")
            if stop_reason is not None:
                _set_all(accuracy, by_depth, length, cells, stop_reason, task)
                continue
            t0 = time.perf_counter()
            try:
                results = _accuracy_by_cell(model, task, options, length, cells, per_cell, b, step, seed, deadline,
                                            after_prompt)
            except _OverBudget:
                stop_reason = OVER_BUDGET
                say(f"length {length}: over budget (stopped while running)")
                _set_all(accuracy, by_depth, length, cells, stop_reason, task)
                continue
            except (MemoryError, RuntimeError) as e:
                if not _is_oom(e):
                    raise
                say(f"length {length}: out of memory ({str(e).splitlines()[0][:120]})")
                _set_all(accuracy, by_depth, length, cells, OUT_OF_MEMORY, task)
                continue
            elapsed = time.perf_counter() - t0
            seconds[length] = elapsed
            tokens_per_s[length] = n_total * length / max(elapsed, 1e-9)
            rate = model.flops_per_token(length, backward=False) * length * n_total / max(elapsed, 1e-9)
            accuracy[length] = sum(results.values()) / len(results)
            if task == "passkey":
                by_depth[length] = results
            say(f"length {length}: accuracy {accuracy[length]:.4f} ({n_total} examples, {elapsed:.1f} s, "
                f"{tokens_per_s[length]:,.0f} tokens/s)")
    finally:
        model.train(was_training)
    out = {"task": task, "options": options, "chance": chance_level(task, options), "examples": per_cell * len(cells),
           "accuracy": accuracy, "seconds": seconds, "tokens_per_s": tokens_per_s, "batch": batches,
           "eval_seconds": time.perf_counter() - start}
    if task == "passkey":
        out["by_depth"] = by_depth
        out["depths"] = [d for _, d in cells]
    return out


def _cells(task: str, examples: int, depths) -> tuple[list[tuple[int, float | None]], int]:
    """The (depth index, depth) cells a length's examples are split over, and the examples
    per cell: the passkey depths, or one cell for the other tasks."""
    if task != "passkey":
        if depths is not None:
            raise ConfigError(f"depths apply to the passkey task only, not {task!r}")
        return [(0, None)], examples
    depths = PASSKEY_DEPTHS if depths is None else tuple(float(d) for d in depths)
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"passkey depths must be in [0, 1]; got {list(depths)}")
    return list(enumerate(depths)), max(1, math.ceil(examples / len(depths)))


def _accuracy_by_cell(model, task, options, length, cells, per_cell, batch, chunk, seed, deadline,
                      after_prompt) -> dict:
    """``{depth: accuracy}`` at ``length``, ``batch`` examples per forward pass; raises
    ``_OverBudget`` as soon as the rest of this length cannot finish by ``deadline``."""
    t0, done, n_total = time.perf_counter(), 0, per_cell * len(cells)
    results = {}
    for depth_index, depth in cells:
        correct = asked = 0
        for first in range(0, per_cell, batch):
            if deadline is not None and done:
                per_example = (time.perf_counter() - t0) / done
                if time.perf_counter() + per_example * (n_total - done) > deadline:
                    raise _OverBudget
            idx = range(first, min(first + batch, per_cell))
            x, y = make_examples(task, options, length, idx, seed=seed, depth=depth, depth_index=depth_index,
                                 after_prompt=after_prompt)
            logits = predict_asked(model, x, y, chunk=chunk, deadline=deadline)
            wanted = y[y != IGNORE]
            correct += int((logits.argmax(-1) == wanted).sum())
            asked += wanted.numel()
            done += len(idx)
            del x, y, logits
        results[depth] = correct / max(asked, 1)
    return results


def _set_all(accuracy, by_depth, length, cells, status, task) -> None:
    accuracy[length] = status
    if task == "passkey":
        by_depth[length] = {d: status for _, d in cells}


def _probe_rate(model, task, options, length, b, chunk, seed, after_prompt) -> float:
    """FLOP/s of the model measured on one short batch (at most 1024 tokens)."""
    probe = max(min(length, 1024), task_min_length(task, options))
    x, y = make_examples(task, options, probe, range(b), seed=seed + 1, after_prompt=after_prompt)
    t0 = time.perf_counter()
    predict_asked(model, x, y, chunk=min(chunk, probe))
    return model.flops_per_token(probe, backward=False) * probe * b / max(time.perf_counter() - t0, 1e-6)


__all__ = [
    "EVAL_SEED_BASE", "OUT_OF_MEMORY", "OVER_BUDGET", "PASSKEY_DEPTHS", "chance_level", "check_lengths",
    "default_max_memory", "evaluate_task", "example_seed", "make_examples", "memory_estimate",
    "parse_lengths", "predict_asked", "task_min_length", "task_options",
]

"""Sequence-parallel training on P = 1, 2, 4 gloo processes: per-rank memory, step time, traffic.

Usage (from the repo root)::

    python bench/sequence_parallel.py                     # T = 8192 for P = 1, 2, 4 + budget search
                                                          # (~8-12 min, depending on the machine's load)
    python bench/sequence_parallel.py --length 1024 --start 512 --max-length 2048 --budget-mb 300
    python bench/sequence_parallel.py --layout zigzag --d-model 512 --layers mamba attention
    python bench/sequence_parallel.py --worlds 1 2        # P = 1, 2 only

Model: a hybrid ``LanguageModel`` (default layers mamba, attention, mamba, attention; d_model
256, 4 heads, no MLP, vocabulary 264), fp32, batch 1, built identically (seed 0) on every rank.
Every rank makes the same token batch of ``T`` tokens, keeps its shard (``shard_sequence``,
``--layout`` contiguous or zigzag) and, when P > 1, runs the model under
``apply_sequence_parallel`` (ring attention, sequence-parallel scan and conv).  One training
step = ``zero_grad`` (in place) + forward + cross-entropy (sum over local tokens / all T
tokens) + backward + ``all_reduce_gradients`` (P > 1).  No optimizer: there are no optimizer
states, and the weights and gradients (replicated on every rank) are the fixed overhead, in
every rank's memory before the measured step.

Each (P, T) case spawns P fresh processes (``--rank``: gloo group over a FileStore in a
temporary directory; results come back as JSON files there).  Each process runs with
``torch.set_num_threads(1)`` (and ``OMP_NUM_THREADS = NUMBA_NUM_THREADS = 1``; the scan's
numba kernel follows torch's thread count): this machine has 2 cores, so P = 1 leaves one
idle and P = 4 oversubscribes them: the P = 4 step times are inflated, and all times are
sensitive to the machine's other load.  The memory and traffic numbers are the point, the
times are indicative.  In each rank:

- warmup: one step on a small batch (64 local tokens): kernels, threads, gloo connections, and
  the parameters' gradients, which from then on are zeroed in place (``set_to_none=False``):
  weights and gradients (replicated, the same for every P) are memory before the step;
- memory: the batch and its shard are built, then the peak-RSS counter is reset
  (``/proc/self/clear_refs``) and one step runs.  "act MB" = the peak RSS of its forward and
  backward (``VmHWM`` read right after ``backward``) - ``VmRSS`` before the step: activations,
  the ring's buffers, temporaries.  "peak MB" = the same over the whole step, the gradient
  all-reduce's flat buffer (P > 1) included: the budget's measure.  Reported: the max over the
  ranks.  Every rank runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so a tensor's memory
  goes back to the system when it is freed: with glibc's default dynamic threshold, freed
  tensors of up to 32 MiB stay in the heap, and RSS then counts memory no tensor uses any more
  (or hides new tensors in memory freed before the step), depending on the allocation history.
  The price: each new tensor's pages fault in afresh, which makes the steps here ~15-30 %
  slower than with the default allocator settings (the same for every P).
- tensor memory: one more step (after the timed ones) under a ``TorchDispatchMode`` that counts
  the bytes of the tensor storages created in the step and still alive; "tensor MB" = their
  peak over forward and backward.  The allocator-independent cross-check of "act MB" (it does
  not see kernels' internal scratch buffers, gloo's or the interpreter's memory).
- time: ``--steps`` more steps (each after a barrier); the median of all timed steps of
  rank 0 (the ranks wait for each other in the collectives, so all see about the same).
- traffic: ``torch.distributed.batch_isend_irecv`` / ``all_gather`` / ``all_reduce`` (and the
  other collectives) are wrapped in the child (longctx.distributed calls them as ``dist.X``,
  so patching the module attributes counts them) and the bytes this rank sends during the
  measured step are added up by phase (forward / backward / gradient all-reduce):
  point-to-point = the isend tensors (exact); all_gather = (P-1) x the local tensor; all_reduce
  = 2 (P-1)/P x the tensor (what a bandwidth-optimal ring sends per rank).  Point-to-point is
  ring attention's traffic; all_gather is the SSM state / conv-tail exchange; all_reduce the
  gradients.  The ring's ideal per rank and step, from the shapes: per attention layer with a
  K/V block of ``2 x (T/P) x kv_heads x head_dim`` fp32 values, (P-1) blocks forward, (P-1)
  blocks and P dK/dV blocks backward (what ``longctx.distributed.ring`` documents); its
  forward is the issue's "(P-1)/P of K and V".  Reported: measured / ideal.

Parts:

1. Fixed total length ``T = --length`` for P = 1, 2, 4 (``--worlds``): per-rank act, tensor and
   peak MB, step seconds, and act / tensor MB x P relative to P = 1 (1 = proportional to T/P).
2. Memory budget: for each P, T doubles while the step's per-rank peak stays within
   ``--budget-mb`` (the step's extra peak, as above), up to ``--max-length``; doubling also
   stops after a step takes over ``--max-seconds``.  When the budget stopped it, ``--refine``
   bisection steps (multiples of 1024) narrow the largest T between the last two tried.  P = 1 starts at ``--start``; a larger P
   at the previous P's largest T (memory grows with T, so shorter lengths need no run),
   halving while that does not fit.  Reported: the largest T that fitted, what stopped the
   search and the lengths tried.  A
   watchdog thread in each rank ends the case as soon as its peak passes the budget (an
   over-budget step is not run to the end; its MB are then shown with a "+").  The times
   here are of the single measured step.

Targets (issue): per-rank activation memory proportional to T/P (act MB x P / act MB at P = 1
within 0.75..1.33, and the same for tensor MB; the act ratio between the sequence-parallel
runs, P = 4 / P = 2, is reported beside it, which separates a constant per-token overhead of
the sequence-parallel path from a failure to scale as 1/P), so the trainable context grows
linearly with P (largest T at P at least P/2 x that at P = 1 when the search was stopped by
the budget, i.e. within one doubling of linear); ring bytes per step = the ideal (ratio
within 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.distributed.layout import shard_sequence
from longctx.distributed.parallelize import all_reduce_gradients, apply_sequence_parallel
from longctx.model import LanguageModel, ModelConfig
from machine import add_out_option, proc_status, write_result
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

WARMUP_LOCAL = 64  # local tokens of the warmup step
MB = 2**20
# glibc malloc: requests from 64 KiB up are mmap'ed and unmapped when freed (a fixed value also
# turns off the dynamic threshold), so RSS follows the memory tensors hold.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}

# ----------------------------------------------------------------------------- child (one rank)

_PHASE = ["setup"]
_BYTES: dict[str, int] = {}


def _add(key: str, n: float) -> None:
    key = f"{_PHASE[0]}/{key}"
    _BYTES[key] = _BYTES.get(key, 0) + int(n)


def _install_counters(world: int) -> None:
    """Wrap the torch.distributed calls longctx.distributed makes (as ``dist.X``)."""
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731

    def wrap(name, count):
        fn = getattr(dist, name)

        def counted(*args, **kwargs):
            count(*args, **kwargs)
            return fn(*args, **kwargs)

        setattr(dist, name, counted)

    def p2p(ops, *a, **k):
        for op in ops:
            if op.op.__name__ == "isend":
                _add(f"p2p tag{op.tag}", nbytes(op.tensor))

    def gather_list(out, tensor, *a, **k):
        _add("all_gather", (world - 1) * nbytes(tensor))

    def gather_flat(out, tensor, *a, **k):
        _add("all_gather", (world - 1) * nbytes(tensor))

    def reduce(tensor, *a, **k):
        _add("all_reduce", 2 * (world - 1) / world * nbytes(tensor))

    def reduce_scatter(out, inputs, *a, **k):
        _add("reduce_scatter", sum(nbytes(t) for t in inputs) - nbytes(out))

    def all_to_all(outs, inputs, *a, **k):
        _add("all_to_all", sum(nbytes(t) for t in inputs) * (world - 1) / world)

    wrap("batch_isend_irecv", p2p)
    wrap("all_gather", gather_list)
    wrap("all_gather_into_tensor", gather_flat)
    wrap("all_reduce", reduce)
    wrap("reduce_scatter", reduce_scatter)
    wrap("all_to_all", all_to_all)


class TensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while this mode is active and that are still
    alive (``now``), and their peak: what the step asks of the allocator, whatever the allocator
    does with it.  Views and in-place results (storages an op got as an input) are not new."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._live:
                continue
            self._live[key] = (size, weakref.ref(storage, lambda _, key=key: self._freed(key)))
            self.now += size
            self.peak = max(self.peak, self.now)
        return out


def build_model(args) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                                     mlp_hidden=0, vocab_size=args.vocab))


def make_batch(args, length: int, layout: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, length + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    if dist.get_world_size() > 1:
        x, y = shard_sequence(x, layout=layout), shard_sequence(y, layout=layout)
    return x.contiguous(), y.contiguous(), length


def train_step(model, x, y, total: int, world: int, after_backward=None) -> float:
    """One step; the gradients (allocated by the first step) are zeroed in place.
    ``after_backward()`` runs between the backward and the gradient all-reduce."""
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=False)
    _PHASE[0] = "forward"
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / total
    _PHASE[0] = "backward"
    loss.backward()
    del loss
    if after_backward is not None:
        after_backward()
    _PHASE[0] = "gradients"
    if world > 1:
        all_reduce_gradients(model)
    _PHASE[0] = "idle"
    return time.perf_counter() - t0


def _watch(rank: int, base: int, limit: int, path: Path, done: threading.Event) -> None:
    """Budget runs: end this rank as soon as its step's extra peak RSS exceeds ``limit``
    (the case is over budget; no need to finish a long step)."""
    while not done.wait(0.05):
        peak = proc_status("VmHWM") - base
        if peak > limit:
            path.write_text(json.dumps({"rank": rank, "over_budget": True, "peak_bytes": peak}))
            os._exit(3)


def rank_main(args) -> None:
    """``--rank`` mode: one rank of a (P, T) case; writes ``rank{r}.json`` in ``--dir``."""
    torch.set_num_threads(1)  # P processes share this machine's 2 cores
    rank, world, tmp = args.rank, args.world, Path(args.dir)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout))
    try:
        model = build_model(args)
        if world > 1:
            apply_sequence_parallel(model, layout=args.layout)
        _install_counters(world)
        train_step(model, *make_batch(args, WARMUP_LOCAL * world, args.layout), world)
        batch = make_batch(args, args.length, args.layout)
        _BYTES.clear()
        dist.barrier()
        base = proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        done = threading.Event()
        if args.abort_mb:
            threading.Thread(target=_watch, daemon=True,
                             args=(rank, base, int(args.abort_mb * MB), tmp / f"rank{rank}.json", done)).start()
        marks = {}
        times = [train_step(model, *batch, world, lambda: marks.setdefault("act", proc_status("VmHWM") - base))]
        done.set()
        peak = proc_status("VmHWM") - base
        traffic = dict(_BYTES)
        for _ in range(args.steps):
            dist.barrier()
            times.append(train_step(model, *batch, world))
        tensors = None
        if args.tensor_bytes:
            dist.barrier()
            with TensorBytes() as counter:
                train_step(model, *batch, world, lambda: marks.setdefault("tensors", counter.peak))
            tensors = marks["tensors"]
        result = {"rank": rank, "peak_bytes": peak, "act_bytes": marks["act"], "tensor_bytes": tensors,
                  "base_rss": base, "seconds": statistics.median(times), "first_seconds": times[0],
                  "bytes": traffic, "local_length": batch[0].shape[1]}
        (tmp / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- parent


def model_flags(args) -> list[str]:
    return ["--layers", *args.layers, "--d-model", str(args.d_model), "--heads", str(args.heads),
            "--vocab", str(args.vocab), "--layout", args.layout, "--timeout", str(args.timeout)]


def run_case(args, world: int, length: int, steps: int, abort_mb: float = 0.0, tensor_bytes: bool = False) -> dict:
    """Spawn ``world`` ranks on a ``length``-token step; the per-rank results combined.  With
    ``abort_mb``, a rank whose step goes over that many MB ends the case early: the result then
    has ``over_budget`` and that rank's peak so far."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--dir", tmp, "--length", str(length), "--steps", str(steps), "--abort-mb", str(abort_mb),
                 *(["--tensor-bytes"] if tensor_bytes else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", **MALLOC_ENV}  # one thread per rank
        logs = [open(Path(tmp) / f"rank{r}.log", "w") for r in range(world)]  # no pipe to fill up
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), *flags,
                                   *model_flags(args)], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
                 for r in range(world)]
        deadline = time.monotonic() + args.timeout
        failed = None
        while any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.returncode not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for p in procs:  # only the ranks this call started
            if p.poll() is None:
                p.kill()
        for p, log in zip(procs, logs):
            p.wait()
            log.close()
        files = [Path(tmp) / f"rank{r}.json" for r in range(world)]
        over = [json.loads(f.read_text()) for f in files if f.exists()]
        over = [r for r in over if r.get("over_budget")]
        if over:  # the other ranks fail or are killed when one leaves the collectives
            return {"P": world, "T": length, "over_budget": True, "peak_bytes": max(r["peak_bytes"] for r in over)}
        failed = next((r for r, p in enumerate(procs) if p.returncode != 0), failed)
        if failed is not None:
            raise RuntimeError(f"P={world} T={length}: rank {failed} failed (exit {procs[failed].returncode}):\n"
                               + (Path(tmp) / f"rank{failed}.log").read_text()[-3000:])
        ranks = [json.loads(f.read_text()) for f in files]
    keys = sorted({k for r in ranks for k in r["bytes"]})
    return {"P": world, "T": length, "peak_bytes": max(r["peak_bytes"] for r in ranks),
            "act_bytes": max(r["act_bytes"] for r in ranks),
            "tensor_bytes": max(r["tensor_bytes"] for r in ranks) if tensor_bytes else None,
            "base_rss": max(r["base_rss"] for r in ranks), "seconds": ranks[0]["seconds"],
            "first_seconds": max(r["first_seconds"] for r in ranks),
            "bytes": {k: max(r["bytes"].get(k, 0) for r in ranks) for k in keys}}


def ring_ideal(args, world: int, length: int) -> dict:
    """Ring attention's bytes per rank per step from the shapes: (P-1) K/V blocks forward;
    (P-1) K/V blocks and P fp32 dK/dV blocks backward, per attention layer."""
    cfg = ModelConfig(layers=args.layers, d_model=args.d_model, n_heads=args.heads, mlp_hidden=0,
                      vocab_size=args.vocab)
    n_attn = sum(name == "attention" for name in cfg.layers)
    block = 2 * (length // world) * cfg.n_kv_heads * cfg.head_dim * 4  # fp32 stacked k, v
    if world == 1:
        return {"forward": 0, "backward": 0}
    return {"forward": n_attn * (world - 1) * block, "backward": n_attn * (2 * world - 1) * block}


def traffic(case: dict) -> dict:
    b = case["bytes"]
    pick = lambda phase, op: sum(v for k, v in b.items() if k.startswith(phase) and op in k)  # noqa: E731
    return {"ring fwd": pick("forward", "p2p"), "ring bwd": pick("backward", "p2p"),
            "ssm": pick("forward", "all_gather") + pick("backward", "all_gather"),
            "grads": pick("gradients", "all_reduce"),
            "other": sum(v for k, v in b.items() if not any(s in k for s in ("p2p", "all_gather", "gradients/")))}


def fixed_length_rows(args) -> tuple[list[dict], dict]:
    rows, cases = [], {}
    for world in args.worlds:
        case = run_case(args, world, args.length, args.steps, tensor_bytes=True)
        cases[(world, args.length)] = case
        t, ideal = traffic(case), ring_ideal(args, world, args.length)
        row = {"part": "fixed T", "P": world, "T": args.length, "T/P": args.length // world,
               "base RSS MB": case["base_rss"] / MB, "act MB": case["act_bytes"] / MB,
               "tensor MB": case["tensor_bytes"] / MB, "peak MB": case["peak_bytes"] / MB, "s/step": case["seconds"],
               "ring MB": (t["ring fwd"] + t["ring bwd"]) / MB,
               "ring ideal MB": (ideal["forward"] + ideal["backward"]) / MB,
               "ring/ideal": ((t["ring fwd"] + t["ring bwd"]) / (ideal["forward"] + ideal["backward"])
                              if ideal["forward"] else "-"),
               "ring fwd/ideal": t["ring fwd"] / ideal["forward"] if ideal["forward"] else "-",
               "ssm MB": t["ssm"] / MB, "grad MB": t["grads"] / MB}
        if t["other"]:
            row["other MB"] = t["other"] / MB
        rows.append(row)
        print(f"P={world} T={args.length}: act {row['act MB']:.0f} MB/rank (tensors {row['tensor MB']:.0f}), "
              f"peak {row['peak MB']:.0f} MB/rank, {case['seconds']:.2f} s/step, "
              f"ring {row['ring MB']:.1f} MB (ideal {row['ring ideal MB']:.1f})", flush=True)
    base = rows[0]
    for r in rows:
        r["peak x P=1"] = r["peak MB"] / base["peak MB"]
        r["act x P/P=1"] = r["act MB"] * r["P"] / base["act MB"] if base["act MB"] > 0 else "-"
        r["tensor x P/P=1"] = r["tensor MB"] * r["P"] / base["tensor MB"] if base["tensor MB"] > 0 else "-"
    return rows, cases


def budget_rows(args, cases: dict) -> list[dict]:
    """Per P, the largest ``start x 2^k`` total length whose step fits in the budget, refined by bisection.  P = 1
    starts at ``--start``; a larger P at the previous P's largest T (memory grows with T, so
    the lengths below it need no run when it fits), halving while that does not fit."""
    rows, previous = [], None
    for world in args.worlds:
        tried = []

        def measure(length: int) -> tuple[dict, bool]:
            case = cases.get((world, length)) or run_case(args, world, length, 0, abort_mb=args.budget_mb)
            cases[(world, length)] = case
            peak = case["peak_bytes"] / MB
            over = bool(case.get("over_budget")) or peak > args.budget_mb
            tried.append(f"{length}{'x' if over else ''}")
            print(f"budget P={world} T={length}: " + (f"over budget ({peak:.0f}{'+' if case.get('over_budget') else ''}"
                  " MB/rank)" if over else f"peak {peak:.0f} MB/rank, {case['first_seconds']:.2f} s"), flush=True)
            return case, over

        def over_text(length: int, case: dict) -> str:
            return f"budget (T={length}: {case['peak_bytes'] / MB:.0f}{'+' if case.get('over_budget') else ''} MB)"

        length = max(args.start, previous or 0)
        best = last = stop = None
        while True:  # down from the previous P's largest T until a length fits
            case, over = measure(length)
            if not over:
                best, last = length, case
                break
            stop = stop or over_text(length, case)
            if length // 2 < args.start:
                break
            length //= 2
        while best is not None and stop is None:  # then up while it fits
            if last["first_seconds"] > args.max_seconds:
                stop = f"time (T={best}: {last['first_seconds']:.0f} s > {args.max_seconds:g})"
            elif 2 * best > args.max_length:
                stop = f"max length {args.max_length}"
            else:
                case, over = measure(2 * best)
                if over:
                    stop = over_text(2 * best, case)
                else:
                    best, last = 2 * best, case
        if best is not None and stop is not None and stop.startswith("budget"):
            # Bisect between the largest fitting length and the first one over budget, so the
            # growth with P is not hidden by the doubling grid.
            high = min(int(t.rstrip("x")) for t in tried if t.endswith("x") and int(t.rstrip("x")) > best)
            for _ in range(args.refine):
                middle = (best + high) // 2 // 1024 * 1024
                if middle <= best:
                    break
                case, over = measure(middle)
                if over:
                    high, stop = middle, over_text(middle, case)
                else:
                    best, last = middle, case
        previous = best
        rows.append({"part": "budget", "P": world, "largest T": best or "-",
                     "peak MB": last["peak_bytes"] / MB if last else "-",
                     "s/step": last["first_seconds"] if last else "-", "stopped by": stop,
                     "tried (x: over)": " ".join(tried)})
    base = rows[0]["largest T"]
    for r in rows:
        r["x P=1"] = r["largest T"] / base if isinstance(base, int) and isinstance(r["largest T"], int) else "-"
    return rows


def targets(args, fixed_rows: list[dict], budget: list[dict]) -> dict:
    out = {}
    scaled = {r["P"]: r["act x P/P=1"] for r in fixed_rows if r["P"] > 1}
    tensors = {r["P"]: r["tensor x P/P=1"] for r in fixed_rows if r["P"] > 1}
    if all(isinstance(v, float) for v in [*scaled.values(), *tensors.values()]):
        ok = all(0.75 <= v <= 1.33 for v in [*scaled.values(), *tensors.values()])
        out["target activation memory ~ T/P"] = (
            f"{'MET' if ok else 'MISSED'} (act MB x P / act MB at P=1: "
            + ", ".join(f"P={p}: {v:.2f}" for p, v in scaled.items()) + "; tensor MB x P / P=1: "
            + ", ".join(f"P={p}: {v:.2f}" for p, v in tensors.items()) + "; 1 = proportional to T/P)")
    else:
        out["target activation memory ~ T/P"] = "n/a (no activation memory measured at P=1)"
    sp = [r for r in fixed_rows if r["P"] > 1 and r["act MB"] > 0]
    if len(sp) > 1:
        out[f"act MB x P, P={sp[-1]['P']} / P={sp[0]['P']} (sequence-parallel runs only)"] = round(
            sp[-1]["act MB"] * sp[-1]["P"] / (sp[0]["act MB"] * sp[0]["P"]), 3)
    ratios = {r["P"]: r["ring/ideal"] for r in fixed_rows if r["P"] > 1 and r["ring/ideal"] != "-"}
    ok = all(abs(v - 1) <= 0.05 for v in ratios.values())
    out["target ring bytes = ideal"] = (f"{'MET' if ok else 'MISSED'} (measured/ideal: "
                                        + ", ".join(f"P={p}: {v:.3f}" for p, v in ratios.items()) + ")"
                                        if ratios else "n/a (no attention layers)")
    base = budget[0]
    if not isinstance(base["largest T"], int) or not base["stopped by"].startswith("budget"):
        out["target context linear in P"] = (f"n/a (P=1 search stopped by {base['stopped by']}, not the budget; "
                                             "raise --max-length / --max-seconds or lower --budget-mb)")
    else:
        parts, ok, known = [], True, True
        for r in budget[1:]:
            grown = r["largest T"] / base["largest T"] if isinstance(r["largest T"], int) else 0.0
            parts.append(f"P={r['P']}: {grown:g}x")
            if grown < r["P"] / 2:
                if r["stopped by"].startswith("budget"):
                    ok = False
                else:
                    known = False  # stopped by time or max length before the budget
        verdict = "MET" if ok and known else "MISSED" if not ok else "n/a (a search stopped before the budget)"
        out["target context linear in P"] = (f"{verdict} (largest T vs P=1: " + ", ".join(parts)
                                             + "; linear = P, within one doubling = P/2)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_option(p)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], metavar="P",
                   help="process counts, increasing from 1 (default 1 2 4)")
    p.add_argument("--length", type=int, default=8192, help="total tokens of the fixed-length part")
    p.add_argument("--steps", type=int, default=1, help="timed steps after the measured one (fixed-length part)")
    p.add_argument("--start", type=int, default=2048, help="first total length of the budget search")
    p.add_argument("--max-length", type=int, default=65536)
    p.add_argument("--budget-mb", type=float, default=1024.0, help="per-rank peak extra memory budget")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop doubling after a step this long")
    p.add_argument("--layers", nargs="+", default=["mamba", "attention", "mamba", "attention"])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=264)
    p.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a case's ranks are killed")
    p.add_argument("--refine", type=int, default=2,
                   help="bisection steps between the largest fitting T and the first over budget")
    p.add_argument("--no-budget", action="store_true", help="only the fixed-length part")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--abort-mb", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--tensor-bytes", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        return rank_main(args)
    if args.worlds[0] != 1 or sorted(set(args.worlds)) != args.worlds:
        p.error(f"--worlds must increase from 1 (the baseline); got {args.worlds}")
    multiple = 2 * max(args.worlds) if args.layout == "zigzag" else max(args.worlds)
    for name in ("length", "start"):
        if getattr(args, name) % multiple:
            p.error(f"--{name} must be a multiple of {multiple} ({args.layout} layout over up to {max(args.worlds)} "
                    "ranks)")

    t0 = time.perf_counter()
    rows, cases = fixed_length_rows(args)
    budget = [] if args.no_budget else budget_rows(args, cases)
    cfg = ModelConfig(layers=args.layers, d_model=args.d_model, n_heads=args.heads, mlp_hidden=0,
                      vocab_size=args.vocab)
    n_params = sum(t.numel() for t in build_model(args).parameters())
    extra = {"model": f"layers {' '.join(cfg.layers)}, d_model {cfg.d_model}, {cfg.n_heads} heads x {cfg.head_dim}, "
                      f"{n_params / 1e6:.2f} M parameters ({n_params * 4 / MB:.1f} MB fp32), batch 1",
             "layout": args.layout, "threads per rank": 1, "cores": os.cpu_count(),
             "budget MB per rank (step's extra peak)": args.budget_mb,
             "load average (1 min)": os.getloadavg()[0], "wall minutes": (time.perf_counter() - t0) / 60}
    if budget:
        extra.update(targets(args, rows, budget))
    else:
        extra.update({k: v for k, v in targets(args, rows, [{"largest T": "-", "stopped by": "not run"}]).items()
                      if "linear in P" not in k})
    write_result("sequence_parallel" + ("" if args.layout == "contiguous" else "_" + args.layout),
                 rows + budget, extra, out=args.out)


if __name__ == "__main__":
    main()

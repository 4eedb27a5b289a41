"""Streaming evaluation cost per token: StreamingLLM's sink cache against the sliding window
with re-computation at the same window (the paper's baseline; up to 22.2x per-token speedup
reported on GPUs for Llama-2 at L = 4 + 4092 and fewer at smaller L), on a small random
model.

Usage (from the repo root)::

    python bench/stream.py                             # 4 x attention, d_model 256; L = 4 + 252 and 4 + 508
    python bench/stream.py --windows 1020 --tokens 64 --repeats 3 --threads 2

For each cache size ``L = sinks + window`` a stream of ``L + tokens + 1`` random ids is scored
by ``longctx.eval.stream_nll`` under ``sinks``, ``dense`` (its context grows from L to
L + tokens: the cost the sink cache caps), ``recompute`` (auto batch of windows per forward
call) and ``recompute`` one window per call.  ms/token is steady state only: the segments
after the first ``L`` predictions (the sink cache is full, each recompute window is a full
``L`` tokens).  Policies run in turn ``--repeats`` times and the median is kept, so a burst
of load on this shared machine lands on all of them.  The recompute rows also give their
achieved GFLOP/s (forward FLOPs of an ``L``-token window per prediction) as a fraction of
this machine's fp32 matmul peak, measured in the same run at the same thread count.

``--threads`` defaults to 1: a one-token step is too small to share between threads, and on
this shared 2-core machine a second OpenMP thread mostly waits for the other (under load a
4-layer step went from ~10 ms to 100-400 ms with 2 threads); recompute's larger forwards
would gain from a second free core, so on an idle machine ``--threads 2`` narrows the gap.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from longctx.eval import stream_nll
from longctx.model import LanguageModel, ModelConfig
from machine import add_out_option, add_peak_option, matmul_gflops, write_result

VOCAB = 264


def steady_ms(result, after: int) -> float:
    """ms/token over the segments that start at or after prediction ``after``."""
    segments = [s for s in result.segments if s.start >= after]
    return sum(s.ms_per_token * s.tokens for s in segments) / sum(s.tokens for s in segments)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_option(p)
    add_peak_option(p)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--windows", type=int, nargs="+", default=[252, 508], help="window sizes (L = sinks + window)")
    p.add_argument("--tokens", type=int, default=32, help="timed predictions after the cache is full")
    p.add_argument("--segment", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (see above)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=args.d_model, layers=["attention"] * args.layers, n_heads=args.heads)
    model = LanguageModel(config).eval()
    peak = matmul_gflops(args.peak_size)
    rows, extra = [], {}
    for window in args.windows:
        span = args.sinks + window
        ids = torch.randint(0, VOCAB, (span + args.tokens + 1,), generator=torch.Generator().manual_seed(1))
        runs = {
            "sinks": dict(cache="sinks", sinks=args.sinks, window=window),
            "dense": dict(cache="dense"),
            "recompute": dict(cache="recompute", sinks=args.sinks, window=window),
            "recompute, 1 window/call": dict(cache="recompute", sinks=args.sinks, window=window, recompute_batch=1),
        }
        times = {name: [] for name in runs}
        results = {}
        for _ in range(args.repeats):
            for name, options in runs.items():
                results[name] = stream_nll(model, ids, segment=args.segment, **options)
                times[name].append(steady_ms(results[name], span))
        ms = {name: statistics.median(t) for name, t in times.items()}
        # Forward FLOPs of one L-token window.
        window_gflop = span * model.flops_per_token(span, backward=False) / 1e9
        for name, r in results.items():
            row = {"L": span, "policy": name, "ms/token": ms[name], "x sinks": ms[name] / ms["sinks"],
                   "ppl": r.ppl, "cache MiB": r.segments[-1].cache_bytes / 2**20}
            if name.startswith("recompute"):
                gflops = window_gflop / (ms[name] / 1e3)
                row.update({"GFLOP/s": gflops, "of peak": gflops / peak})
            rows.append(row)
        extra[f"L={span}: sinks speedup over recompute (per token)"] = ms["recompute"] / ms["sinks"]
        extra[f"L={span}: recompute batching gain"] = ms["recompute, 1 window/call"] / ms["recompute"]
    extra["model"] = (f"{args.layers} x attention, d_model {args.d_model}, {args.heads} heads, vocab {VOCAB}, random "
                      f"weights; {args.tokens} timed tokens after the first L, median of {args.repeats}; "
                      f"{torch.get_num_threads()} thread(s)")
    extra["matmul GFLOP/s (machine, fp32)"] = peak
    write_result("stream", rows, extra, out=args.out)


if __name__ == "__main__":
    main()

"""Training throughput: tokens/s and model-FLOPs utilisation (MFU) of a LanguageModel step.

Usage (from the repo root)::

    python bench/train_throughput.py                       # 8 x attention, d_model 512, T 1024, batch 4
    python bench/train_throughput.py --seq-len 2048 --batch 2 --compile --profile

One step = forward + cross-entropy, backward, grad-norm clip (1.0) + the AdamW of
``longctx train`` (decay groups, fused kernel), on random
byte-level ids (vocab 264), fp32.  After ``--warmup`` steps, ``--steps`` steps are timed
with ``perf_counter`` around each phase (CPU ops are synchronous); phase times are medians.

MFU = tokens/s x ``model.flops_per_token(seq_len)`` / fp32 matmul FLOP/s, the latter measured
in this run by bench/machine.py (before and after the steps; the larger is used).
Target: MFU >= 30%.  ``--profile`` prints the top ops of one step (torch.profiler).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from longctx.model.config import ModelConfig
from longctx.model.lm import LanguageModel
from longctx.train.config import TrainConfig
from longctx.train.optim import make_optimizer
from machine import add_out_option, add_peak_option, matmul_gflops, write_result


def step(model, fwd, opt, ids) -> tuple[float, float, float]:
    """One training step; returns (forward, backward, optimizer) seconds."""
    t0 = time.perf_counter()
    logits = fwd(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_option(p)
    add_peak_option(p)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--profile", action="store_true", help="print top ops of one step")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=264, d_model=args.d_model, layers=["attention"] * args.layers,
                         n_heads=args.heads)
    model = LanguageModel(config)
    fwd = torch.compile(model) if args.compile else model
    opt = make_optimizer(model, TrainConfig())  # the optimizer `longctx train` uses
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1))
    peak_before = matmul_gflops(args.peak_size)

    for _ in range(args.warmup):
        step(model, fwd, opt, ids)
    phases = [step(model, fwd, opt, ids) for _ in range(args.steps)]
    peak_after = matmul_gflops(args.peak_size)
    peak = max(peak_before, peak_after) * 1e9

    fwd_s, bwd_s, opt_s = (statistics.median(x) for x in zip(*phases))
    step_s = statistics.median(sum(x) for x in phases)
    tokens = args.batch * args.seq_len
    flops_tok = model.flops_per_token(args.seq_len)
    tok_s = tokens / step_s
    mfu = tok_s * flops_tok / peak
    rows = [
        {"phase": name, "ms": s * 1e3, "% step": 100 * s / step_s,
         "GFLOP/s": (flops_tok * tokens * share / s / 1e9) if share else None}
        for name, s, share in [("forward+loss", fwd_s, 1 / 3), ("backward", bwd_s, 2 / 3),
                               ("clip+AdamW", opt_s, 0), ("step", step_s, 1)]
    ]
    extra = {
        "config": f"{args.layers} x attention, d_model {args.d_model}, heads {args.heads}, "
                  f"seq_len {args.seq_len}, batch {args.batch}"
                  + (", compiled" if args.compile else ""),
        "params (non-embedding)": model.num_parameters(embeddings=False),
        "threads": torch.get_num_threads(),
        "load average (1 min)": os.getloadavg()[0],
        "model GFLOP/token": flops_tok / 1e9,
        "tokens/s": tok_s,
        "matmul GFLOP/s (before, after)": f"{peak_before:.0f}, {peak_after:.0f}",
        "MFU %": 100 * mfu,
        "target MFU >= 30%": "MET" if mfu >= 0.3 else "MISSED",
    }
    name = "train_throughput" + ("_compiled" if args.compile else "")
    write_result(name, rows, extra, out=args.out)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            times = step(model, fwd, opt, ids)
        print("profiled step (forward, backward, optimizer) ms:", [round(t * 1e3) for t in times])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()

"""Selective scan benchmark: longctx ``selective_scan`` vs ``selective_scan_ref`` vs transformers.

Usage (from the repo root)::

    python bench/scan.py                          # fwd and fwd+bwd, T = 1K, 4K, 16K (~3-4 min)
    python bench/scan.py --lengths 4096 --modes fwd --channels 768 --batch 2
    python bench/scan.py --candidates             # numba kernel vs chunked torch vs torch.compile at 4K

Inputs are those of one Mamba block (channels = d_inner 1536, state 16, fp32): u, delta
(raw, before bias + softplus), A = -exp(A_log) with A_log = log(1..16), B, C
``(batch, time, state)``, D, z (gate), delta_bias; ``delta_softplus=True``.

Implementations, on the same tensors:

- ``ours``: ``longctx.ops.scan.selective_scan`` (the numba kernel on CPU).
- ``ref``: ``selective_scan_ref``, the Python loop over time.
- ``hf``: transformers' ``mamba_selective_scan`` (models/mamba/modeling_mamba.py), the scan
  part of ``MambaMixer.slow_forward``'s CPU path: it materialises discrete A and deltaB_u
  as ``(batch, channels, time, state)``, then loops over time.  Called as is, on
  ``(batch, channels, time)`` transposed views; its y is checked against ours.
  Its backward is quadratic in time (each step's ``discrete_A[:, :, t]`` gradient is a full
  zero tensor: 1.2 s at T=256, 16-51 s at T=512, 147 s at T=1K on this machine), so
  fwd+bwd runs only up to ``--hf-bwd-max`` (512) and longer T get a lower bound: the larger
  of hf fwd at that T and one hf fwd+bwd call at T=512 (a longer sequence runs more steps
  of the same loop, none cheaper).

Measured: time = median of ``--repeats`` calls after a warmup (up to 30 calls for fast
cases), implementations interleaved call by call so load from other processes hits them
alike.  Memory = extra peak RSS of one call in a fresh subprocess (``/proc/self/clear_refs``,
``VmHWM - VmRSS``), as bench/attention.py.  Bandwidth = bytes that must move (inputs read and
outputs written: fwd reads u, delta, z, B, C and writes y; fwd+bwd adds reading them and dy
again and writing du, ddelta, dz, dB, dC) / time, and its fraction of this machine's
copy bandwidth (bench/machine.py).  The scan is compute-bound (16 exp per (time, channel)),
so this fraction stays low: it says how far from a memory-bound kernel the op is.

Target: ours >= 20x faster than ref and hf at T=4K, fwd and fwd+bwd.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from longctx.ops.scan import selective_scan, selective_scan_ref
from machine import add_out_option, memory_gbps, proc_status, write_result

IMPLS = ("ours", "ref", "hf")


def _hf_scan():
    """transformers' torch scan (the CPU path of MambaMixer.slow_forward), or None."""
    try:
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan
    except ImportError:
        return None
    return mamba_selective_scan


def make_inputs(args, length: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    b, c, n = args.batch, args.channels, args.state
    x = {
        "u": torch.randn(b, length, c, generator=g),
        "delta": torch.randn(b, length, c, generator=g) - 4,
        "A": -torch.arange(1, n + 1.0).repeat(c, 1),
        "B": torch.randn(b, length, n, generator=g),
        "C": torch.randn(b, length, n, generator=g),
        "D": torch.ones(c),
        "z": torch.randn(b, length, c, generator=g),
        # inverse softplus of dt ~ exp(U(log 1e-3, log 1e-1)), as Mamba's init
        "delta_bias": torch.expm1(torch.exp(torch.rand(c, generator=g) * math.log(100) + math.log(1e-3))).log(),
    }
    for t in x.values():
        t.requires_grad_(grad)
    x["dy"] = torch.randn(b, length, c, generator=g)
    return x


def run(impl: str, x):
    """One forward call; returns y ``(batch, time, channels)``."""
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    if impl == "ours":
        return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw)[0]
    if impl == "ref":
        return selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw)[0]
    t = lambda a: a.transpose(1, 2)  # noqa: E731  (batch, time, k) -> (batch, k, time)
    kw["z"] = t(x["z"])
    return t(_hf_scan()(t(x["u"]), t(x["delta"]), x["A"], t(x["B"]), t(x["C"]), **kw))


def call(impl: str, x, backward: bool) -> float:
    """Time one call (forward, or forward + backward); returns seconds."""
    t0 = time.perf_counter()
    if backward:
        run(impl, x).backward(x["dy"])
        for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
            x[k].grad = None
    else:
        with torch.no_grad():
            run(impl, x)
    return time.perf_counter() - t0


def one(args, impl: str, length: int, backward: bool) -> None:
    """Subprocess mode: print the extra peak RSS (bytes) of one call as JSON."""
    x = make_inputs(args, length, backward)
    call(impl, make_inputs(args, 64, backward), backward)  # load kernels, start the thread pools
    base = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    call(impl, x, backward)
    print(json.dumps({"peak_bytes": proc_status("VmHWM") - base}))


def peak_memory(args, impl: str, length: int, backward: bool) -> int:
    flags = ["--channels", str(args.channels), "--state", str(args.state), "--batch", str(args.batch)]
    cmd = [sys.executable, __file__, "--one", impl, str(length), "fwdbwd" if backward else "fwd", *flags]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def moved_bytes(args, length: int, backward: bool) -> int:
    """Bytes that must cross memory: inputs read and outputs written (fp32)."""
    btc = args.batch * length * args.channels * 4
    btn = args.batch * length * args.state * 4
    fwd = 4 * btc + 2 * btn  # read u, delta, z, B, C; write y
    return fwd + (4 * btc + 2 * btn) + (3 * btc + 2 * btn) if backward else fwd  # + reads again, dy; du, ddelta, dz, dB, dC


def skip_reason(args, impl: str, length: int, backward: bool) -> str | None:
    if impl == "hf":
        if _hf_scan() is None:
            return "transformers is not installed"
        if backward and length > args.hf_bwd_max:
            return (f"hf fwd+bwd skipped at T={length}: its backward is quadratic in time "
                    f"(minutes at T=1K); shown as a lower bound (> hf fwd at T={length} and "
                    f"> hf fwd+bwd at T={args.hf_bwd_max})")
        gb = 3 * args.batch * args.channels * length * args.state * 4 / 1e9
        if gb > args.hf_max_gb:
            return f"hf skipped at T={length}: its (batch, channels, time, state) tensors need ~{gb:.1f} GB"
    if impl == "ref" and backward and length > args.ref_bwd_max:
        return f"ref fwd+bwd skipped at T={length}: ~{2.3 * length / 4096:.0f} s per call (> --ref-bwd-max)"
    return None


def check_outputs(args, length: int, impls) -> dict:
    """Max |y - y_ours| / max |y_ours| of each baseline on the same inputs."""
    x = make_inputs(args, min(length, 4096), False)
    with torch.no_grad():
        ours = run("ours", x)
        scale = ours.abs().max().item()
        return {f"max rel diff {i} vs ours (T={min(length, 4096)})": (run(i, x) - ours).abs().max().item() / scale
                for i in impls if i != "ours"}


def hf_fwdbwd_ms(args) -> float | None:
    """One hf fwd+bwd call at T = --hf-bwd-max (after a warmup at T=64), in ms: a lower bound
    for every longer T, where its loop runs more steps, each at least as costly."""
    if args.hf_bwd_max <= 0 or _hf_scan() is None:
        return None
    call("hf", make_inputs(args, 64, True), True)
    ms = call("hf", make_inputs(args, args.hf_bwd_max, True), True) * 1e3
    print(f"fwd+bwd T={args.hf_bwd_max} hf: {ms:.0f} ms (one call; the lower bound for longer T)", flush=True)
    return ms


def bench(args) -> None:
    gbps = memory_gbps()
    rows, notes = [], {}
    hf_fwd_ms = {}
    hf_floor = None  # hf fwd+bwd at --hf-bwd-max, measured when a longer T needs it
    for backward in [m == "fwdbwd" for m in args.modes]:
        mode = "fwd+bwd" if backward else "fwd"
        for length in args.lengths:
            impls = []
            for impl in IMPLS:
                reason = skip_reason(args, impl, length, backward)
                if reason:
                    print(reason, flush=True)
                    notes[f"skipped {impl} {mode} T={length}"] = reason
                else:
                    impls.append(impl)
            x = make_inputs(args, length, backward)
            first = {impl: call(impl, x, backward) for impl in impls}  # warmup
            n = min(30, max(args.repeats, int(2.0 / first["ours"])))
            times = {impl: [] for impl in impls}
            for i in range(n):
                for impl in impls:
                    if impl == "ours" or i < args.repeats:
                        times[impl].append(call(impl, x, backward))
            del x
            ours_ms = statistics.median(times["ours"]) * 1e3
            for impl in impls:
                t = statistics.median(times[impl])
                mem = peak_memory(args, impl, length, backward)
                moved = moved_bytes(args, length, backward)
                row = {"mode": mode, "T": length, "impl": impl, "ms": t * 1e3, "x ours": t * 1e3 / ours_ms,
                       "MB": mem / 2**20, "GB/s": moved / t / 1e9, "% mem bw": 100 * moved / t / 1e9 / gbps}
                rows.append(row)
                if impl == "hf" and not backward:
                    hf_fwd_ms[length] = t * 1e3
                print(f"{mode} T={length} {impl}: {t * 1e3:.1f} ms, {mem / 2**20:.1f} MB", flush=True)
            if backward and "hf" not in impls and length in hf_fwd_ms:
                if hf_floor is None and length > args.hf_bwd_max:
                    hf_floor = hf_fwdbwd_ms(args)
                bound = max(hf_fwd_ms[length], hf_floor or 0.0)
                rows.append({"mode": mode, "T": length, "impl": "hf (lower bound)", "ms": bound,
                             "x ours": bound / ours_ms})
                notes[f"hf fwd+bwd lower bound T={length}"] = (
                    f"max(hf fwd at T={length}: {hf_fwd_ms[length]:.0f} ms, "
                    f"hf fwd+bwd at T={args.hf_bwd_max}: {hf_floor or float('nan'):.0f} ms)")
    notes.update(check_outputs(args, max(args.lengths), [i for i in IMPLS if skip_reason(args, i, 1024, False) is None]))
    notes.update(targets(rows))
    notes.update({"channels": args.channels, "state": args.state, "batch": args.batch, "memory GB/s": gbps,
                  "load average (1 min)": os.getloadavg()[0]})
    write_result("scan", rows, notes, out=args.out)


def targets(rows) -> dict:
    out = {}
    for mode in ("fwd", "fwd+bwd"):
        for impl in ("ref", "hf"):
            r = [x for x in rows if x["mode"] == mode and x["T"] == 4096 and x["impl"].startswith(impl)]
            if r:
                ratio = r[0]["x ours"]
                if r[0]["impl"] != impl:
                    out[f"target ours >= 20x {impl} at 4K {mode}"] = (
                        f"{'MET' if ratio >= 20 else 'not shown'} on a lower bound of hf's time "
                        f"(its fwd+bwd at 4K takes tens of minutes): >= {ratio:.1f}x")
                else:
                    out[f"target ours >= 20x {impl} at 4K {mode}"] = f"{'MET' if ratio >= 20 else 'MISSED'} ({ratio:.1f}x)"
    return out


def candidates(args) -> None:
    """The formulations considered for the CPU path, at one length: the numba kernel (ours),
    the chunked torch scan (the path for non-CPU devices), and torch.compile of its chunk."""
    from longctx.ops.scan import chunked as torch_scan

    length = args.lengths[0] if args.lengths != DEFAULT_LENGTHS else 4096
    x = make_inputs(args, length, True)
    compiled_chunk = torch.compile(torch_scan.scan_chunk, dynamic=False)

    def chunked(compiled: bool):
        def fn(u, delta, A, B, C, D, z, delta_bias):
            if not compiled:
                return torch_scan.scan_chunked(u, delta, A, B, C, D, z, delta_bias, True)[0]
            dt = torch.nn.functional.softplus(delta + delta_bias)
            h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
            ys = []
            for t0 in range(0, length, torch_scan.CHUNK):
                s = slice(t0, t0 + torch_scan.CHUNK)
                y, h = compiled_chunk(h, u[:, s], dt[:, s], A, B[:, s, None], C[:, s, None])
                ys.append(y)
            return (torch.cat(ys, 1) + D * u) * torch.nn.functional.silu(z)
        return fn

    fns = {"numba kernel (ours)": lambda *a: selective_scan(*a[:5], D=a[5], z=a[6], delta_bias=a[7],
                                                            delta_softplus=True)[0],
           "chunked torch": chunked(False), "torch.compile(chunk)": chunked(True),
           "ref (loop)": lambda *a: selective_scan_ref(*a[:5], D=a[5], z=a[6], delta_bias=a[7],
                                                       delta_softplus=True)[0]}
    keys = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    rows = []
    for name, fn in fns.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(*(x[k] for k in keys))
        first = time.perf_counter() - t0
        fwd, fb = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(*(x[k] for k in keys))
            t1 = time.perf_counter()
            fn(*(x[k] for k in keys)).backward(x["dy"])
            fb.append(time.perf_counter() - t1)
            fwd.append(t1 - t0)
        rows.append({"candidate": name, "T": length, "fwd ms": 1e3 * statistics.median(fwd),
                     "fwd+bwd ms": 1e3 * statistics.median(fb), "first call s": first})
        print(rows[-1], flush=True)
    write_result("scan_candidates", rows, {"channels": args.channels, "state": args.state, "batch": args.batch},
                 out=args.out)


DEFAULT_LENGTHS = [1024, 4096, 16384]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_option(p)
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--channels", type=int, default=1536)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of the baselines (ours: more)")
    p.add_argument("--ref-bwd-max", type=int, default=4096, help="longest T for ref fwd+bwd")
    p.add_argument("--hf-bwd-max", type=int, default=512,
                   help="longest T for hf fwd+bwd (quadratic: ~15 s at 512); its time there bounds longer T")
    p.add_argument("--hf-max-gb", type=float, default=6.0, help="skip hf when its 4D tensors exceed this")
    p.add_argument("--candidates", action="store_true", help="compare CPU formulations instead")
    p.add_argument("--one", nargs=3, metavar=("IMPL", "T", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args, args.one[0], int(args.one[1]), args.one[2] == "fwdbwd")
    if args.candidates:
        return candidates(args)
    bench(args)


if __name__ == "__main__":
    main()

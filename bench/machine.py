"""This machine's limits, measured in the same run as a benchmark, and result output.

- ``matmul_gflops``: best of ``repeats`` square ``n x n`` matmuls (``2 n^3`` FLOPs each), run
  with all the threads torch uses; the denominator of every "fraction of peak".
- ``memory_gbps``: best of several copies of a 256 MiB tensor, (bytes read + written) / time.
- ``memory_read_gbps``: best of several sums of a 512 MiB tensor, bytes read / time: the
  bound of a decoding step, which reads its weights and writes almost nothing.
- ``machine_info``: torch version, thread count, CPU model.
- ``write_result``: print rows as an aligned plain-text table and write
  ``<name>.json`` (rows, extra, machine info) in ``bench/results/``, or in the directory
  of the ``--out`` option that ``add_out_option`` gives a script.
- ``add_peak_option``: a script's ``--peak-size``, the ``n`` of ``matmul_gflops``.

Benchmark scripts import this module as ``from machine import ...``; it works because
``python bench/<script>.py`` puts ``bench/`` first on ``sys.path``.  Run this file alone
(``python bench/machine.py``) to print the machine's numbers.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` value in bytes (``VmRSS``, ``VmHWM``): the peak-memory
    measurements of the benchmarks read these after resetting the peak with
    ``/proc/self/clear_refs``."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def matmul_gflops(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """Best achieved GFLOP/s of ``n x n @ n x n`` over ``repeats`` runs.

    Preceded by ~0.3 s of warmup matmuls: the first calls here run at half speed (thread
    pool start-up, page faults, clock ramp), which would understate the peak.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    t_end = time.perf_counter() + 0.3
    while time.perf_counter() < t_end:
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def memory_gbps(mbytes: int = 256, repeats: int = 5) -> float:
    """Best (bytes read + bytes written) / time of copying a ``mbytes`` MiB fp32 tensor."""
    src = torch.randn(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def memory_read_gbps(mbytes: int = 512, repeats: int = 5) -> float:
    """Best bytes read / time of summing a ``mbytes`` MiB fp32 tensor (all torch threads)."""
    src = torch.randn(mbytes * 2**20 // 4)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return src.nbytes / best / 1e9


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),  # other processes share these cores
    }


def _fmt(x) -> str:
    if isinstance(x, float):
        if x != x:
            return "-"
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return "-" if x is None else str(x)


def format_table(rows: list[dict]) -> str:
    """Aligned plain-text table; columns are the union of row keys in first-seen order."""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    cells = [cols] + [[_fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_out_option(parser) -> None:
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help="directory for the JSON result (default bench/results)")


def add_peak_option(parser) -> None:
    parser.add_argument("--peak-size", type=int, default=2048, metavar="N",
                        help="n of the n x n matmuls that measure this machine's peak (default 2048)")


def write_result(name: str, rows: list[dict], extra: dict | None = None, out: Path = RESULTS) -> Path:
    """Print ``rows`` as a table (plus ``extra`` as key: value lines) and save them as
    ``out/<name>.json``."""
    print(format_table(rows))
    for key, value in (extra or {}).items():
        print(f"{key}: {_fmt(value)}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
               "extra": extra or {}, "rows": rows}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    info = machine_info()
    info["matmul_gflops_fp32"] = matmul_gflops()
    info["memory_gbps"] = memory_gbps()
    info["memory_read_gbps"] = memory_read_gbps()
    for key, value in info.items():
        print(f"{key}: {_fmt(value)}")

"""Serving under load: ``longctx serve`` with 1 client, then 8 at once (continuous batching).

Usage (from the repo root)::

    python bench/serve.py                               # smollm2-135m; 1 and 8 clients x 4 requests
    python bench/serve.py --model RUN --clients 1 4 8 --requests 2 --max-tokens 16

The server runs as ``longctx serve MODEL`` in a subprocess of its own (``--threads``
threads, ``--max-batch``), so the clients' Python does not compete with it for the GIL.
For each client count C, C threads each send ``--requests`` streamed, greedy chat
completions with the official ``openai`` client (every request its own question, so the
prefix cache saves only the chat template's head), one after the other; a request's
latency is from sending to its last event, its time to first token the first text.
Aggregate tokens/s: the completion tokens of all requests (``usage``) / the wall time of
the C clients.  Errors are counted, not raised.  ``--repeats`` > 1 runs the client counts
in turn that many times and keeps each one's best run (this machine is shared: alternating
keeps a burst of other load from landing on one count only).

Limits, measured in the same run at the same thread count: one sequence's decoding cannot
beat the memory read bandwidth / the bytes of the weights (each step reads them all); a
batch of B sequences reads them once per step for all B, so B times that, and it cannot
beat the matmul GFLOP/s / the FLOPs per token (2 per weight).

Target: aggregate tokens/s with 8 clients >= 3x that with 1 client.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import torch

from machine import add_out_option, add_peak_option, matmul_gflops, memory_read_gbps, write_result

QUESTIONS = ["the sea", "a lighthouse", "autumn", "a robot", "the moon", "a library", "trains", "a garden",
             "snow", "a violin", "the desert", "a clock", "bees", "a bridge", "rain", "a kite"]


def load(url: str, model: str, clients: int, requests: int, max_tokens: int, api_key: str = "none",
         timeout: float = 300.0) -> dict:
    """``clients`` threads sending ``requests`` streamed greedy chat completions each to the
    server at ``url`` (its ``/v1`` base).  Returns the wall ``seconds``, and per request
    (``results``): client, prompt, text, completion tokens, latency and time to first
    token in seconds, or the error."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=timeout)
    results, lock = [], threading.Lock()

    def one(c: int, r: int) -> dict:
        topic = QUESTIONS[(c * requests + r) % len(QUESTIONS)]
        prompt = f"Client {c}, request {r}: write a short poem about {topic}."
        start = time.perf_counter()
        out = {"client": c, "prompt": prompt}
        try:
            pieces, first, tokens = [], None, 0
            for chunk in client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            done = time.perf_counter()
            out.update(text="".join(pieces), tokens=tokens, latency=done - start,
                       ttft=(first or done) - start)
        except Exception as e:  # counted: a load test reports errors instead of stopping at the first
            out["error"] = f"{type(e).__name__}: {e}"
        return out

    def work(c: int) -> None:
        for r in range(requests):
            result = one(c, r)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - start, "results": results}


def summary(clients: int, run: dict) -> dict:
    """One table row of a ``load`` run."""
    ok = [r for r in run["results"] if "error" not in r]
    latencies = sorted(r["latency"] for r in ok)

    def pct(q: float) -> float:  # nearest rank
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(run["results"]), "errors": len(run["results"]) - len(ok),
            "tokens": tokens, "seconds": run["seconds"], "p50 latency s": pct(0.5), "p99 latency s": pct(0.99),
            "mean ttft s": statistics.mean(r["ttft"] for r in ok) if ok else float("nan"),
            "tokens/s": tokens / run["seconds"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    """``longctx serve`` on ``port``, once its ``/health`` answers."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               NUMBA_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "longctx", "serve", args.model, "--port", str(port), "--max-batch",
           str(args.max_batch), "--weights", args.weights, "--max-queue", str(max(16, max(args.clients)))]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}):\n{server.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise SystemExit("the server did not start within 300 s")
        time.sleep(0.5)


def weight_bytes_and_flops(model_path: str, weights: str) -> tuple[int, float]:
    """The bytes of the linear layers' weights (what a decoding step reads) and the matmul
    FLOPs per token, of the model as the server loads it."""
    from longctx.layers.quantized import QuantizedLinear
    from longctx.train.runs import load_run

    _, model, _, _ = load_run(model_path, weights=weights)
    linears = [m for m in model.modules() if isinstance(m, (QuantizedLinear, torch.nn.Linear))]
    read = sum(t.nbytes for m in linears for t in (*m.buffers(recurse=False), *m.parameters(recurse=False)))
    flops = 2 * sum(m.in_features * m.out_features for m in linears)
    return read, flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_option(p)
    add_peak_option(p)
    p.add_argument("--model", default="smollm2-135m", help="what `longctx serve` takes (default smollm2-135m)")
    p.add_argument("--weights", choices=("fp32", "int8", "int4"), default="fp32")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, one run each")
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of each client count; the best is kept")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    read, flops = weight_bytes_and_flops(args.model, args.weights)
    gflops, read_gbps = matmul_gflops(args.peak_size), memory_read_gbps()
    port = free_port()
    server = start_server(args, port)
    rows, best = [], {}
    try:
        url = f"http://127.0.0.1:{port}/v1"
        model_id = httpx.get(url + "/models").json()["data"][0]["id"]
        load(url, model_id, 2, 1, 4)  # warm-up: kernels compiled (the batched step's too), tables built
        for _ in range(args.repeats):
            for clients in args.clients:
                row = summary(clients, load(url, model_id, clients, args.requests, args.max_tokens))
                if clients not in best or row["tokens/s"] > best[clients]["tokens/s"]:
                    best[clients] = row
        for clients, row in best.items():
            batch = min(clients, args.max_batch)
            row["limit tok/s"] = min(batch * read_gbps * 1e9 / read, gflops * 1e9 / flops)
            rows.append(row)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").json()
    finally:
        server.terminate()
        server.wait(timeout=60)

    extra = {"model": args.model, "weights": args.weights, "threads": args.threads, "max batch": args.max_batch,
             "requests": f"{args.requests} per client, streamed greedy chat, max_tokens {args.max_tokens}; "
                         f"best of {args.repeats}",
             "server mean batch": metrics["mean_batch"], "weights MB": read / 1e6,
             "matmul GFLOP/s (machine)": gflops, "memory read GB/s (machine)": read_gbps,
             "load average": os.getloadavg()}
    by_clients = {r["clients"]: r for r in rows}
    if 1 in by_clients and 8 in by_clients:
        ratio = by_clients[8]["tokens/s"] / by_clients[1]["tokens/s"]
        extra["8 clients / 1 client tokens/s"] = f"{ratio:.2f}x (target >= 3x: {'MET' if ratio >= 3 else 'MISSED'})"
    write_result("serve", rows, extra, out=args.out)


if __name__ == "__main__":
    main()

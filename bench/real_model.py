"""Real-model speed: SmolLM2-135M-Instruct (the installed Q4_1 GGUF file) prefilling and
decoding with longctx (fp32, int8, int4 weights), llama.cpp (llama-cpp-python) and
transformers' GGUF-loaded model: the same file, text, thread count and greedy decoding.

Usage (from the repo root)::

    python bench/real_model.py                        # contexts 512 and 4096, 32 new tokens
    python bench/real_model.py --contexts 512 --new-tokens 16 --systems longctx-int8 llama.cpp

For each context C, the first C tokens of the stdlib ``email`` package's source (its
modules in name order, tokenized by the model's tokenizer: the same ids for every system)
are prefilled in one call, timed (prefill tokens/s), then ``--new-tokens`` tokens are
decoded greedily, one step per token, from that context (decode tokens/s over the steps
after the first token).  longctx runs ``longctx.generation.stream`` (a KV cache sized for
C + new tokens); llama.cpp ``Llama.eval`` (``n_batch`` 512) with the argmax of its logits;
transformers a ``DynamicCache`` and ``logits_to_keep=1``, as its ``generate`` does.

Each system runs in a subprocess of its own with ``--threads`` threads (torch, numba,
OpenMP, llama.cpp), so its peak resident memory (VmHWM) is its own and no thread pool
carries over; a missing ``llama_cpp`` or ``transformers`` skips that system with a message.
``--repeats`` > 1 keeps each context's best pass (this machine is shared).

Limits, measured in the same run at the same thread count: decode tokens/s cannot exceed
the memory read bandwidth / the bytes a step reads (the weights it multiplies by, in the
system's format, and the KV cache at context C); prefill tokens/s cannot exceed the fp32
matmul GFLOP/s / the FLOPs per token (every matmul, attention at C, the LM head once).

Targets: longctx decode with int8 or int4 weights >= llama.cpp's tokens/s and >= 5x
transformers'; longctx prefill at the largest context >= llama.cpp's.
"""

from __future__ import annotations

import argparse
import email
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from machine import add_out_option, add_peak_option, matmul_gflops, memory_read_gbps, proc_status, write_result

LONGCTX = ("longctx-fp32", "longctx-int8", "longctx-int4")
SYSTEMS = (*LONGCTX, "llama.cpp", "transformers")
WORKER_FLAG = "--worker"


def email_source() -> str:
    """The stdlib ``email`` package's Python source, its modules in name order."""
    root = Path(email.__file__).parent
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py")))


# --------------------------------------------------------------------------------------
# Workers: one system each, in a subprocess; they print one JSON line.


def _time_context(prefill, step, first_token, new_tokens: int) -> dict:
    """Time ``prefill()`` (returns logits of the last position) and ``new_tokens - 1``
    greedy steps ``step(token) -> logits``; the tokens and both rates."""
    start = time.perf_counter()
    logits = prefill()
    token = first_token(logits)
    prefilled = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens - 1):
        token = first_token(step(token))
        tokens.append(token)
    done = time.perf_counter()
    return {"prefill_s": prefilled - start, "decode_s": done - prefilled, "tokens": tokens}


def run_longctx(kind: str, model_path: str, ids: list[int], contexts: list[int], new_tokens: int) -> dict:
    from longctx.generation import stream
    from longctx.layers.quantized import QuantizedLinear
    from longctx.train.runs import load_run

    start = time.perf_counter()
    _, model, _, _ = load_run(model_path, weights=kind)
    loaded = time.perf_counter() - start
    read = sum(t.nbytes for m in model.modules() if isinstance(m, (QuantizedLinear, torch.nn.Linear))
               for t in (*m.buffers(recurse=False), *m.parameters(recurse=False)))
    c = model.config
    kv_bytes = len(c.layers) * 2 * c.n_kv_heads * c.head_dim * 4  # fp32 keys and values, per cached token
    list(stream(model, ids[:16], 4, temperature=0))  # warm-up: kernels loaded, tables built

    def timed(context: int) -> dict:
        it = stream(model, ids[:context], new_tokens, temperature=0, state=model.init_state(1, context + new_tokens))
        return _time_context(lambda: next(it), lambda _: next(it), int, new_tokens)

    return {"load_s": loaded, "weight_bytes": read, "kv_bytes_per_token": kv_bytes, "timed": timed}


def run_llama_cpp(model_path: str, ids: list[int], contexts: list[int], new_tokens: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    from longctx.model.gguf import GGUFFile

    start = time.perf_counter()
    llm = Llama(model_path, n_ctx=max(contexts) + new_tokens + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    loaded = time.perf_counter() - start
    file = GGUFFile(model_path)
    read = sum(t.n_bytes for t in file.tensors.values())  # token_embd is also the output layer: read whole
    c = file.metadata
    kv_bytes = c["llama.block_count"] * 2 * c["llama.attention.head_count_kv"] * (
        c["llama.embedding_length"] // c["llama.attention.head_count"]) * 2  # f16 cache

    def last_logits():  # the last evaluated token's row (eval keeps no logits unless logits_all)
        return np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    def timed(context: int) -> dict:
        llm.reset()

        def prefill():
            llm.eval(ids[:context])
            return last_logits()

        def step(token):
            llm.eval([token])
            return last_logits()

        return _time_context(prefill, step, lambda logits: int(np.argmax(logits)), new_tokens)

    llm.eval(ids[:16])  # warm-up
    return {"load_s": loaded, "weight_bytes": read, "kv_bytes_per_token": kv_bytes, "timed": timed}


def run_transformers(model_path: str, ids: list[int], contexts: list[int], new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    path = Path(model_path)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    loaded = time.perf_counter() - start
    read = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    c = model.config
    kv_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4

    @torch.no_grad()
    def timed(context: int) -> dict:
        cache = DynamicCache(config=model.config)

        def forward(x):
            return model(input_ids=torch.tensor([x]), past_key_values=cache, use_cache=True,
                         logits_to_keep=1).logits[0, -1]

        return _time_context(lambda: forward(ids[:context]), lambda token: forward([token]),
                             lambda logits: int(logits.argmax()), new_tokens)

    timed(16)  # warm-up
    return {"load_s": loaded, "weight_bytes": read, "kv_bytes_per_token": kv_bytes, "timed": timed}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    ids = json.loads(Path(args.ids).read_text())
    system = args.worker
    try:
        if system in LONGCTX:
            import numba

            numba.set_num_threads(args.threads)
            run = run_longctx(system.split("-")[1], args.model, ids, args.contexts, args.new_tokens)
        elif system == "llama.cpp":
            run = run_llama_cpp(args.model, ids, args.contexts, args.new_tokens, args.threads)
        else:
            run = run_transformers(args.model, ids, args.contexts, args.new_tokens)
    except ImportError as e:
        print(json.dumps({"skipped": f"{system} skipped: {e.name or e} is not installed"}))
        return
    timed = run.pop("timed")
    results = {}
    for context in args.contexts:
        passes = [timed(context) for _ in range(args.repeats)]
        results[context] = {
            "prefill_tps": context / min(p["prefill_s"] for p in passes),
            "decode_tps": (args.new_tokens - 1) / min(p["decode_s"] for p in passes),
            "tokens": passes[0]["tokens"],
        }
    print(json.dumps({**run, "contexts": results, "peak_rss": proc_status("VmHWM")}))


# --------------------------------------------------------------------------------------
# The parent: the text, the machine's limits, one subprocess per system, the table.


def prefill_flops_per_token(model, context: int) -> float:
    """Forward FLOPs per token of a ``context``-token prefill: the model's count
    (``flops_per_token``) with the LM head once per prompt instead of once per token."""
    lm_head = model.config.vocab_size * model.config.d_model
    return model.flops_per_token(context, backward=False) - 2 * lm_head * (1 - 1 / context)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_option(p)
    add_peak_option(p)
    p.add_argument("--model", default=None, help="GGUF file (default: the installed smollm2-135m)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded after each prefill")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="passes per context; the best is kept")
    p.add_argument(WORKER_FLAG, choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from longctx.model.gguf import from_gguf
    from longctx.model.installed import installed_model_path

    model_path = str(args.model or installed_model_path("smollm2-135m"))
    model, tokenizer = from_gguf(model_path)
    ids = tokenizer.encode(email_source())
    if len(ids) < max(args.contexts):
        raise SystemExit(f"the email package's source is {len(ids)} tokens; the largest context must be at most that")
    flops = {c: prefill_flops_per_token(model, c) for c in args.contexts}
    del model
    torch.set_num_threads(args.threads)
    gflops, read_gbps = matmul_gflops(args.peak_size), memory_read_gbps()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               NUMBA_NUM_THREADS=str(args.threads))
    results, skipped = {}, []
    ids_file = Path(args.out) / "real_model_ids.json"
    ids_file.parent.mkdir(parents=True, exist_ok=True)
    ids_file.write_text(json.dumps(ids[: max(args.contexts)]))
    try:
        for system in args.systems:
            cmd = [sys.executable, __file__, WORKER_FLAG, system, "--ids", str(ids_file), "--model", model_path,
                   "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--repeats",
                   str(args.repeats), "--contexts", *map(str, args.contexts)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{system} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if "skipped" in result:
                print(result["skipped"])
                skipped.append(system)
            else:
                results[system] = result
    finally:
        ids_file.unlink()

    rows = []
    for system, r in results.items():
        row = {"system": system, "load s": r["load_s"], "weights MB": r["weight_bytes"] / 1e6}
        for c in args.contexts:
            row[f"prefill tok/s {c}"] = r["contexts"][str(c)]["prefill_tps"]
        for c in args.contexts:
            row[f"decode tok/s {c}"] = r["contexts"][str(c)]["decode_tps"]
        for c in args.contexts:
            read = r["weight_bytes"] + r["kv_bytes_per_token"] * c
            row[f"decode limit {c}"] = read_gbps * 1e9 / read
        row["peak RSS MB"] = r["peak_rss"] / 2**20
        rows.append(row)

    extra = {
        "model": Path(model_path).name,
        "text": f"stdlib email package source, {len(ids)} tokens; contexts {args.contexts}; "
                f"{args.new_tokens} greedy tokens each",
        "threads": args.threads,
        "matmul GFLOP/s (machine)": gflops,
        "memory read GB/s (machine)": read_gbps,
    }
    for c in args.contexts:
        extra[f"prefill limit tok/s {c}"] = gflops * 1e9 / flops[c]
    extra.update(targets(results, args.contexts))
    if skipped:
        extra["skipped"] = ", ".join(skipped)
    write_result("real_model", rows, extra, out=args.out)


def targets(results: dict, contexts: list[int]) -> dict:
    """The targets' verdicts, and whether the systems decode the same greedy tokens."""
    def rate(system, what, c):
        return results[system]["contexts"][str(c)][what]

    quantized = [s for s in ("longctx-int8", "longctx-int4") if s in results]
    out = {}
    for c in contexts:
        if not quantized:
            break
        best = max(quantized, key=lambda s: rate(s, "decode_tps", c))
        for other, factor in (("llama.cpp", 1), ("transformers", 5)):
            if other in results:
                ratio = rate(best, "decode_tps", c) / rate(other, "decode_tps", c)
                verdict = "MET" if ratio >= factor else "MISSED"
                out[f"decode {c}: {best} / {other}"] = f"{ratio:.2f}x (target >= {factor}x: {verdict})"
    longctx = [s for s in LONGCTX if s in results]
    if longctx and "llama.cpp" in results:
        c = max(contexts)
        best = max(longctx, key=lambda s: rate(s, "prefill_tps", c))
        ratio = rate(best, "prefill_tps", c) / rate("llama.cpp", "prefill_tps", c)
        out[f"prefill {c}: {best} / llama.cpp"] = f"{ratio:.2f}x (target >= 1x: {'MET' if ratio >= 1 else 'MISSED'})"
    if "longctx-fp32" in results:
        for other in results:
            if other != "longctx-fp32":
                same = [rate(other, "tokens", c) == rate("longctx-fp32", "tokens", c) for c in contexts]
                out[f"same greedy tokens as longctx-fp32: {other}"] = f"{sum(same)} of {len(same)} contexts"
    return out


if __name__ == "__main__":
    main()

"""Generation speed: our recurrent Mamba decoding against transformers', and the cost of
one decode step as the context grows (Mamba: constant; attention: grows with the cache).

Usage (from the repo root)::

    python bench/generate.py                       # 4 x mamba, d_model 256; contexts 1K and 64K
    python bench/generate.py --new-tokens 128 --contexts 1024 16384

1. Tokens/s: a random 4-layer, d_model 256 ``MambaForCausalLM`` (transformers) is saved and
   imported with ``longctx.model.hf.from_hf``; both generate ``--new-tokens`` greedy tokens
   after the same 32-token prompt, with their own caches, one batch row. The outputs are
   checked to be the same tokens. Target: ours >= 3x transformers.
2. Decode step at context C: median time of one token step after C tokens of context.
   Mamba prefills C real tokens (its state has the same size at every C); the attention
   model (4 layers, d_model 256, 4 heads) gets a KV cache of C random keys/values, since a
   step's cost does not depend on their values. Target: Mamba's 64K step within 10% of its 1K step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from longctx.generation import generate
from longctx.model import LanguageModel, ModelConfig
from longctx.model.hf import from_hf
from machine import memory_gbps, write_result

VOCAB = 264


def hf_mamba(d_model: int, layers: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=d_model, num_hidden_layers=layers, state_size=16,
                                   eos_token_id=None, pad_token_id=0, bos_token_id=0)
    return transformers.MambaForCausalLM(cfg).eval()


def tokens_per_second(fn, new_tokens: int, repeats: int = 3) -> tuple[float, torch.Tensor]:
    fn()  # warmup (first-call kernels, compilation)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times), out


def step_time(model: LanguageModel, state, steps: int = 30) -> float:
    token = torch.tensor([[1]])
    times = []
    with torch.no_grad():
        for _ in range(steps):
            start = time.perf_counter()
            model(token, state)
            times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def context_state(model: LanguageModel, context: int):
    """A state after ``context`` tokens: real prefill for SSM layers, random KV for attention."""
    state = model.init_state(1, max_len=context + 64)
    if all(name == "attention" for name in model.config.layers):
        c = model.config
        for layer in state.layers:
            k = torch.randn(1, context, c.n_kv_heads, c.head_dim)
            layer.update(k, torch.randn_like(k))
        state.seq_len = context
        return state
    ids = torch.randint(0, VOCAB, (1, context))
    with torch.no_grad():
        for start in range(0, context, 8192):
            model(ids[:, start : start + 8192], state)
    return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 65536])
    args = p.parse_args()

    hf = hf_mamba(args.d_model, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = from_hf(tmp)
    prompt = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    with torch.no_grad():
        hf_tps, hf_out = tokens_per_second(
            lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False), n)
    our_tps, our_out = tokens_per_second(lambda: generate(ours, prompt, n, temperature=0), n)
    same = torch.equal(hf_out[:, -n:], our_out[:, -n:])
    rows = [
        {"what": "transformers MambaForCausalLM.generate", "tokens/s": hf_tps, "x transformers": 1.0},
        {"what": "longctx generate (recurrent state)", "tokens/s": our_tps, "x transformers": our_tps / hf_tps},
    ]

    attention = LanguageModel(ModelConfig(vocab_size=VOCAB, d_model=args.d_model, layers=["attention"] * args.layers,
                                          n_heads=4)).eval()
    step_ms = {}
    for name, model in (("mamba", ours), ("attention", attention)):
        for context in args.contexts:
            state = context_state(model, context)
            step_ms[(name, context)] = 1e3 * step_time(model, state)
            rows.append({"what": f"{name}: one decode step at context {context}", "ms": step_ms[(name, context)]})
    lo, hi = min(args.contexts), max(args.contexts)
    mamba_growth = step_ms[("mamba", hi)] / step_ms[("mamba", lo)]
    extra = {
        "model": f"{args.layers} x mamba, d_model {args.d_model}, state 16, vocab {VOCAB}; greedy, batch 1",
        "same tokens as transformers": same,
        "speedup over transformers": our_tps / hf_tps,
        "target >= 3x": "MET" if our_tps / hf_tps >= 3 else "MISSED",
        f"mamba step {hi} / {lo}": mamba_growth,
        "target mamba step within 10%": "MET" if mamba_growth <= 1.10 else "MISSED",
        f"attention step {hi} / {lo}": step_ms[("attention", hi)] / step_ms[("attention", lo)],
        "memory GB/s (machine)": memory_gbps(),
    }
    write_result("generate", rows, extra)


if __name__ == "__main__":
    main()

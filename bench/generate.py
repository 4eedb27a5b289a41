"""Generation speed: our recurrent Mamba decoding against transformers', and the cost of
one decode step as the context grows (Mamba: constant; attention: grows with the cache).

Usage (from the repo root)::

    python bench/generate.py                       # 4 x mamba, d_model 256; contexts 1K and 64K
    python bench/generate.py --new-tokens 128 --contexts 1024 16384

1. Tokens/s: a random 4-layer, d_model 256 ``MambaForCausalLM`` (transformers) is saved and
   imported with ``longctx.model.hf.from_hf``; both generate ``--new-tokens`` greedy tokens
   after the same 32-token prompt, with their own caches, one batch row. The outputs are
   checked to be the same tokens. Target: ours >= 3x transformers.
2. Decode step at context C: time of one token step after C tokens of context, as the
   median over 20 samples of a burst of ``--burst`` consecutive steps (divided by the burst),
   contexts interleaved sample by sample.
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
from machine import add_out_option, memory_gbps, write_result

VOCAB = 264
SAMPLES = 20  # timed bursts of decode steps per context


def hf_mamba(d_model: int, layers: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=d_model, num_hidden_layers=layers, state_size=16,
                                   eos_token_id=None, pad_token_id=0, bos_token_id=0)
    return transformers.MambaForCausalLM(cfg).eval()


def interleaved_seconds(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, called in turn ``repeats`` times after a warmup
    call each: alternating keeps a burst of load on this shared machine from landing on
    one side only."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def decode_steps(model: LanguageModel, state, steps: int) -> None:
    """``steps`` consecutive one-token steps, as in generation (weights stay in cache)."""
    with torch.no_grad():
        for _ in range(steps):
            model(torch.tensor([[1]]), state)


def context_state(model: LanguageModel, context: int, room: int):
    """A state after ``context`` tokens, with cache room for ``room`` more: real prefill for
    SSM layers, random KV for attention."""
    state = model.init_state(1, max_len=context + room)
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
    add_out_option(p)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 65536])
    p.add_argument("--burst", type=int, default=16, help="consecutive steps per timed sample")
    args = p.parse_args()

    hf = hf_mamba(args.d_model, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = from_hf(tmp)
    prompt = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    outputs = {}

    def run_hf():
        with torch.no_grad():
            outputs["hf"] = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def run_ours():
        outputs["ours"] = generate(ours, prompt, n, temperature=0)

    seconds = interleaved_seconds({"hf": run_hf, "ours": run_ours}, repeats=5)
    hf_tps, our_tps = n / seconds["hf"], n / seconds["ours"]
    same = torch.equal(outputs["hf"][:, -n:], outputs["ours"][:, -n:])
    rows = [
        {"what": "transformers MambaForCausalLM.generate", "tokens/s": hf_tps, "x transformers": 1.0},
        {"what": "longctx generate (recurrent state)", "tokens/s": our_tps, "x transformers": our_tps / hf_tps},
    ]

    attention = LanguageModel(ModelConfig(vocab_size=VOCAB, d_model=args.d_model, layers=["attention"] * args.layers,
                                          n_heads=4)).eval()
    # Each model's contexts are timed interleaved with each other only: a 64K attention step
    # streams ~0.5 GB of cache, which would evict the Mamba weights before its next step.
    step_ms = {}
    for name, model in (("mamba", ours), ("attention", attention)):
        steps = {}
        for context in args.contexts:
            state = context_state(model, context, room=args.burst * (SAMPLES + 1))
            steps[(name, context)] = lambda model=model, state=state: decode_steps(model, state, args.burst)
        for key, seconds in interleaved_seconds(steps, repeats=SAMPLES).items():
            step_ms[key] = 1e3 * seconds / args.burst
    for (name, context), ms in step_ms.items():
        rows.append({"what": f"{name}: one decode step at context {context}", "ms": ms})
    lo, hi = min(args.contexts), max(args.contexts)
    mamba_growth = step_ms[("mamba", hi)] / step_ms[("mamba", lo)]
    extra = {
        "model": f"{args.layers} x mamba, d_model {args.d_model}, state 16, vocab {VOCAB}; greedy, batch 1",
        "same tokens as transformers": same,
        "speedup over transformers": our_tps / hf_tps,
        "target >= 3x": "MET" if our_tps / hf_tps >= 3 else "MISSED",
        f"mamba step {hi} / {lo}": mamba_growth,
        "target mamba step within 10%": "MET" if abs(mamba_growth - 1) <= 0.10 else "MISSED",
        f"attention step {hi} / {lo}": step_ms[("attention", hi)] / step_ms[("attention", lo)],
        "memory GB/s (machine)": memory_gbps(),
    }
    write_result("generate", rows, extra, out=args.out)


if __name__ == "__main__":
    main()

"""The attention-sink acceptance on SmolLM2-135M: README figure stream-smollm2-135m.png and its table.

    OMP_NUM_THREADS=1 python docs/figures/stream_smollm2.py runs/stream-smollm2   # ~85 min on 1 core

Runs what `longctx stream-eval smollm2-135m --data pyref.txt --cache dense,window,sinks,recompute
--sinks 4 --window 508 --tokens 10241 --segment 512 --max-len 8192 --recompute-every 8 --out OUT`
runs (same calls, so OUT/stream.md, stream.json and stream.png are that command's), keeps every
policy's per-token nll (OUT/token_nll.npz; reused if present), and reports all four policies at the
positions recompute evaluated (every 8th), so the comparison with recompute is paired.
The text: the Python language reference topics of the running Python (pydoc_data.topics; 3.11.7 here).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from longctx.data import encode_corpus
from longctx.eval import plot_stream, stream, stream_compare, stream_table
from longctx.train.runs import load_run

SINKS, WINDOW, TOKENS, SEGMENT, EVERY, DENSE_MAX = 4, 508, 10241, 512, 8, 8192
L = SINKS + WINDOW
FIGURE = Path(__file__).with_name("stream-smollm2-135m.png")


def run(out: Path) -> None:
    from pydoc_data.topics import topics

    text = out / "pyref.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)) + "\n")
    _, model, tokenizer, _ = load_run("smollm2-135m", None, "fp32")
    tokens, _ = encode_corpus(text, tokenizer)
    ids = torch.as_tensor(tokens[:TOKENS], dtype=torch.long)
    results = stream_compare(model, ids, ["dense", "window", "sinks", "recompute"], sinks=SINKS, window=WINDOW,
                             segment=SEGMENT, max_len=DENSE_MAX, recompute_every=EVERY, progress=True)
    print(stream_table(results, "text"))
    (out / "stream.json").write_text(json.dumps({n: r.to_dict() for n, r in results.items()}, indent=1))
    (out / "stream.md").write_text(stream_table(results, "markdown") + "\n")
    plot_stream(results, out / "stream.png", title=f"smollm2-135m: {len(ids):,} tokens")
    np.savez(out / "token_nll.npz", **{n: r.nll for n, r in results.items()})


def paired(out: Path) -> None:
    raw, js = np.load(out / "token_nll.npz"), json.loads((out / "stream.json").read_text())
    n = len(raw["recompute"])
    nll = {p: np.concatenate([raw[p], np.full(n - len(raw[p]), np.nan, np.float32)]).astype(np.float64) for p in js}
    evaluated = np.isfinite(nll["recompute"])

    def ppl(p, m):
        return float(np.exp(nll[p][m].mean())) if np.isfinite(nll[p][m]).all() else None

    print("| predictions (evaluated) | dense | window | sinks | recompute | sinks / recompute |")
    print("|---|---:|---:|---:|---:|---:|")
    for a, b in zip([0, L - 1, 1024, 2048, 4096, DENSE_MAX], [L - 1, 1024, 2048, 4096, DENSE_MAX, n]):
        m = np.zeros(n, bool)
        m[a:b] = evaluated[a:b]
        v = {p: ppl(p, m) for p in js}
        cells = ["-" if v[p] is None else f"{v[p]:.2f}" for p in ("dense", "window", "sinks", "recompute")]
        print(f"| {a}-{b - 1} ({m.sum()}) | " + " | ".join(cells) + f" | {v['sinks'] / v['recompute']:.3f} |")
    after = evaluated.copy()
    after[: L - 1] = False
    diff = nll["sinks"][after] - nll["recompute"][after]
    rng = np.random.default_rng(0)
    boot = [np.exp(diff[rng.integers(0, len(diff), len(diff))].mean()) for _ in range(2000)]
    print(f"after eviction ({after.sum()} paired predictions): " +
          ", ".join(f"{p} {ppl(p, after):.2f}" for p in ("window", "sinks", "recompute")) +
          f"; sinks / recompute {np.exp(diff.mean()):.3f} (bootstrap 95% {np.percentile(boot, 2.5):.3f}-"
          f"{np.percentile(boot, 97.5):.3f})")
    for p, r in js.items():
        segs = r["segments"]
        print(f"{p}: ppl over all its {r['tokens']} predictions {r['ppl']:.2f}, {r['ms_per_token']:.0f} ms/token, "
              f"{r['seconds']:.0f} s, peak RSS {max(s['rss_bytes'] for s in segs) / 2**20:.0f} MiB, "
              f"cache {max(s['cache_bytes'] for s in segs) / 2**20:.1f} MiB")

    # The figure: stream.png's panels, every policy's segment perplexity at recompute's positions.
    results = {}
    for p, r in js.items():
        segs = []
        for s in r["segments"]:
            x = nll[p][s["start"]:s["end"]][evaluated[s["start"]:s["end"]]]
            segs.append(stream.StreamSegment(s["start"], s["end"], float(x.mean()), float(np.exp(x.mean())),
                                             s["ms_per_token"], s["rss_bytes"], s["cache_bytes"]))
        results[p] = stream.StreamResult(p, raw[p], segs, r["stream_tokens"], r["sinks"], r["window"], r["span"],
                                         r["stopped_at"])
    save = stream.save_figure

    def labelled(fig, path):  # plain labels on the perplexity axis, which spans more than a decade
        from matplotlib.ticker import FixedLocator, NullFormatter

        ax = fig.axes[0]
        ax.yaxis.set_major_locator(FixedLocator([4, 5, 6, 8, 10, 15, 20, 30, 40]))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axvline(L, color="gray", linewidth=0.8)
        ax.annotate(f"L = {L}: first tokens leave", (L, ax.get_ylim()[1]), fontsize=8, color="gray",
                    xytext=(3, -10), textcoords="offset points")
        return save(fig, path)

    stream.save_figure = labelled
    try:
        plot_stream(results, FIGURE, title=f"SmolLM2-135M, {SINKS} sinks + {WINDOW} window, {js['sinks']['stream_tokens']:,} tokens\n"
                    f"perplexity at the positions recompute evaluated (every {EVERY}th)")
    finally:
        stream.save_figure = save
    print(f"wrote {FIGURE}")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/stream-smollm2")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "token_nll.npz").exists():
        run(out)
    paired(out)

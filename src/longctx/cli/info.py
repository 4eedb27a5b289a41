"""``longctx info RUN``: what a run (or a model file) holds, as a short summary or as JSON."""

from __future__ import annotations

import argparse
import json
from itertools import groupby
from pathlib import Path


def _layers(layers: list[str]) -> str:
    """``["mamba", "mamba", "attention"]`` -> ``"2 mamba, 1 attention"``."""
    return ", ".join(f"{len(list(group))} {name}" for name, group in groupby(layers))


def _mixers(c) -> list[str]:
    """One line per kind of mixer the model uses, with the settings that kind reads."""
    lines = []
    kinds = set(c.layers)
    if kinds & {"attention", "dilated"}:
        kv = f" ({c.n_kv_heads} key/value)" if c.n_kv_heads != c.n_heads else ""
        window = f", window {c.attn_window}" if c.attn_window else ""
        scaling = f", {c.rope_scaling['rope_type']} scaling" if c.pos == "rope" and c.rope_scaling else ""
        theta = f" (theta {c.rope_theta:g}{scaling})" if c.pos == "rope" else ""
        lines.append(f"attention: {c.n_heads} heads{kv} of {c.head_dim}, positions {c.pos}{theta}{window}")
    if "dilated" in kinds:
        lines.append("dilated: segments " + ", ".join(map(str, c.dilated_segments)) + " with rates "
                     + ", ".join(map(str, c.dilated_rates)))
    if "mamba" in kinds:
        selective = "" if c.ssm_selective else ", time-invariant"
        lines.append(f"mamba: state {c.ssm_state}, expand {c.ssm_expand}, conv {c.ssm_conv}{selective}")
    if "mamba2" in kinds:
        lines.append(f"mamba2: state {c.ssm_state}, heads of {c.ssm_head_dim}, {c.ssm_groups} group(s), "
                     f"chunk {c.ssm_chunk}")
    return lines


def _best_validation(run: Path) -> tuple[float, int] | None:
    from longctx.train.metrics import read_metrics

    vals = [(r["val_bpb"], r["step"]) for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r]
    return min(vals) if vals else None


def summary_lines(source: str, cfg, model, tokenizer, path: Path) -> list[str]:
    """The human summary of a model loaded by ``load_run``."""
    from longctx.train.checkpoint import list_checkpoints

    c = model.config
    run = Path(source)
    lines = [f"{source}: {'a run' if (run / 'checkpoints').is_dir() else 'a model file'} ({path})",
             f"architecture: {_layers(c.layers)} layers of d_model {c.d_model}"
             + (f", MLP {c.mlp_hidden}" if c.mlp_hidden else ", no MLP"),
             *[f"  {line}" for line in _mixers(c)],
             f"parameters: {model.num_parameters():,} ({model.num_parameters(embeddings=False):,} without embeddings)"]
    context = [f"trained at {cfg.train.seq_len} tokens" if (run / "metrics.jsonl").is_file() else None,
               f"trained context {c.context_len}" if c.context_len else None,
               f"at most {c.max_seq_len} positions" if c.max_seq_len else "no position limit"]
    lines.append("context: " + "; ".join(x for x in context if x))
    if tokenizer is None:
        lines.append("tokenizer: none")
    else:
        template = ", chat template" if getattr(tokenizer, "chat_template", None) else ""
        lines.append(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size:,} tokens{template}")
    if (run / "checkpoints").is_dir():
        summary = run / "summary.json"
        step = json.loads(summary.read_text()).get("step") if summary.is_file() else None
        trained = f"{step} of {cfg.train.steps} steps" if step is not None else "imported or not yet summarised"
        best = _best_validation(run)
        if best is not None:
            trained += f"; best validation {best[0]:.3f} bits/byte at step {best[1]}"
        lines.append(f"trained: {trained}")
        names = [p.name for p in list_checkpoints(run)]
        lines.append(f"checkpoints: {', '.join(names)} (latest {path.name})")
    return lines


def info(args: argparse.Namespace) -> int:
    from longctx.train.checkpoint import list_checkpoints
    from longctx.train.runs import load_run

    cfg, model, tokenizer, path = load_run(args.run)
    if not args.json:
        print("\n".join(summary_lines(args.run, cfg, model, tokenizer, path)))
        return 0
    summary_path = Path(args.run) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    print(json.dumps({
        "run": str(args.run),
        "parameters": model.num_parameters(),
        "tokenizer": tokenizer.kind if tokenizer else None,
        "latest_checkpoint": path.name,
        "checkpoints": [p.name for p in list_checkpoints(args.run)] if Path(args.run).is_dir() else [],
        "summary": summary,
        "config": cfg.to_dict(),
    }, indent=2))
    return 0

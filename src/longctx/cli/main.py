"""``longctx`` command line: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path

from longctx.cache.policy import CACHE_POLICIES, DEFAULT_SINKS, DEFAULT_WINDOW, RECALL_DEFAULTS
from longctx.cli.info import info
from longctx.cli.tasks import add_task_commands
from longctx.configs import preset_names

# Mistakes a user can fix, reported in one line (exit code 2): ConfigError, DataError,
# CheckpointError and the ops' errors are ValueErrors; a missing file or installed model is
# a FileNotFoundError; a diverging run a FloatingPointError.  Modules load only when a
# command needs them, so that --help and argument errors answer at once.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def _need_tokenizer(tokenizer, run) -> None:
    from longctx.data import DataError

    if tokenizer is None:
        raise DataError(f"{run} has no tokenizer (an imported checkpoint without tokenizer.json); "
                        "text in and out needs one")


def _train(args: argparse.Namespace) -> int:
    from longctx.model import ConfigError
    from longctx.train import load_run_config, train
    from longctx.train.checkpoint import read_run_config

    out = Path(args.out)
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume takes the run's own config.json; drop --preset/--config "
                              "(use --set to change train settings)")
        cfg = load_run_config(base=read_run_config(out), overrides=args.set)
    else:
        cfg = load_run_config(args.preset or "tiny", args.config, args.set)
    if args.data is not None:
        cfg.data.path = args.data
    if args.sequence_parallel is not None:
        cfg.train.sequence_parallel = args.sequence_parallel
        cfg.train.__post_init__()
    result = train(cfg, out, resume=args.resume, stop_at=args.stop_at, progress=not args.quiet)
    if result.interrupted:
        return 130
    if int(os.environ.get("RANK", "0")):  # under torchrun, rank 0 reports
        return 0
    if result.val is not None:
        print(
            f"final: validation {result.val['bpb']:.3f} bits/byte (loss {result.val['loss']:.4f}, "
            f"perplexity {result.val['ppl']:.2f}); unigram byte model {result.unigram_bpb:.3f} bits/byte"
        )
    if result.sample is not None:
        print("sample:\n" + result.sample)
    print(f"run saved in {out}; next:\n"
          f"  longctx generate {out} --prompt 'def ' --max-new-tokens 200   # continue a text\n"
          f"  longctx eval {out} --data PATH                              # bits per byte on other text\n"
          f"  longctx info {out}                                          # what the run holds")
    return 0


def _check_session_args(args: argparse.Namespace) -> None:
    """Refuse bad generation options before anything is loaded or printed."""
    from longctx.generation.sampling import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < -1 or (args.max_new_tokens == -1 and args.command == "chat"):
        allowed = ">= 0" if args.command == "chat" else ">= 0, or -1 for no limit (until eos or Ctrl-C)"
        raise ValueError(f"--max-new-tokens must be {allowed}; got {args.max_new_tokens}")
    if args.draft and args.cache != "dense":
        raise ValueError(f"--draft drops rejected draft tokens from the cache, which --cache {args.cache} cannot "
                         "do: use --cache dense, or no --draft")


def _session(args: argparse.Namespace):
    """Model, tokenizer and state for ``generate`` and ``chat``: a fresh state with the
    chosen cache policy, or the saved session of ``--load-state``."""
    from longctx.train.runs import load_run

    _check_session_args(args)
    _, model, tokenizer, _ = load_run(args.run, args.checkpoint, args.weights)
    _need_tokenizer(tokenizer, args.run)
    cache = {"cache": args.cache, "sinks": args.sinks, "window": args.window, **_recall_args(args, [args.cache])}
    state = model.load_state(args.load_state, **cache) if args.load_state else model.init_state(1, **cache)
    return model, tokenizer, state


# The recall cache's options: init_state's name -> the command line's.
RECALL_FLAGS = {"block": "--block-size", "topk": "--blocks", "repr_tokens": "--repr-tokens",
                "memory_dir": "--memory-dir", "positions": "--recall-positions"}


def _recall_args(args: argparse.Namespace, policies: list[str]) -> dict:
    """The recall options given on the command line (init_state's names); refused unless
    ``policies`` include recall."""
    given = {name: getattr(args, name) for name in RECALL_FLAGS if getattr(args, name) is not None}
    if given and "recall" not in policies:
        raise ValueError(f"{', '.join(RECALL_FLAGS[name] for name in given)} apply to --cache recall only")
    return given


def _sampling(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
            "draft": args.draft, "draft_tokens": args.draft_tokens}


def _save_session(args: argparse.Namespace, model, state) -> None:
    if args.save_state:
        model.save_state(state, args.save_state)
        print(f"state after {state.seq_len} tokens saved to {args.save_state}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> int:
    from longctx.generation import stream_text

    model, tokenizer, state = _session(args)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new_tokens = None if args.max_new_tokens == -1 else args.max_new_tokens
    for piece in stream_text(model, tokenizer, args.prompt, new_tokens, state=state, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _save_session(args, model, state)
    return 0


def _chat(args: argparse.Namespace) -> int:
    """One line from stdin per turn; the reply streams until the end-of-turn token, ``--stop``
    text or ``--max-new-tokens``.  Every turn continues the same state.  A model whose
    tokenizer has a chat template gets it (unless ``--template`` is given)."""
    from longctx.generation import stream_text
    from longctx.generation.chat import ChatSession

    model, tokenizer, state = _session(args)
    template = getattr(tokenizer, "chat_template", None) if args.template is None else None
    if template is None:
        args.template = args.template or "USER: {prompt}\n\nASSISTANT: "
        if "{prompt}" not in args.template:
            raise ValueError(f"--template must contain {{prompt}}; got {args.template!r}")
    elif args.load_state:
        raise ValueError("a chat template session cannot continue a saved state (the conversation so far is not "
                         "saved with it); give --template to chat on a saved state")
    chat = None if template is None else ChatSession(template, tokenizer.bos_token, tokenizer.eos_token,
                                                     system=args.system)
    sampling = _sampling(args)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        prompt = args.template.format(prompt=text) if chat is None else chat.turn(text)
        reply = ""
        for piece in stream_text(model, tokenizer, prompt, args.max_new_tokens, state=state,
                                 templated=chat is not None, **sampling):
            reply += piece
            if args.stop and args.stop in reply:
                piece = piece[: len(piece) - (len(reply) - reply.index(args.stop))]
                sys.stdout.write(piece)
                break
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if chat is not None:
            pending = state.extra.get("pending")
            chat.reply(reply, ended=pending is not None and int(pending[0, 0]) == tokenizer.eos_id)
        sampling["seed"] = None  # later turns continue the session's RNG
    _save_session(args, model, state)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from longctx.data import encode_corpus, iter_windows
    from longctx.eval import evaluate_loss
    from longctx.eval.perplexity import plot_loss_by_position, position_bins
    from longctx.train.runs import load_run

    cfg, model, tokenizer, path = load_run(args.run, args.checkpoint, args.weights)
    _need_tokenizer(tokenizer, args.run)
    tokens, _ = encode_corpus(args.data, tokenizer)
    if args.max_tokens:
        tokens = tokens[: args.max_tokens + 1]
    seq_len = args.seq_len or cfg.train.seq_len
    result = evaluate_loss(model, iter_windows(tokens, seq_len, args.batch_size), tokenizer.token_bytes(),
                           by_position=args.by_position)
    result.update(checkpoint=str(path), data=args.data, seq_len=seq_len)
    by_position = result.pop("by_position", None)
    chart = None
    if by_position is not None:
        chart = Path(args.plot) if args.plot else Path(args.run) / "loss_by_position.png"
        chart = plot_loss_by_position(by_position, chart, title=f"{args.run}: loss against position "
                                                                f"({result['tokens']:,} tokens)")
        result["by_position"] = [float(v) for v in by_position]
        result["position_bins"] = [{"first": a, "last": b, "loss": loss} for a, b, loss in position_bins(by_position)]
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['tokens']:,} tokens at context {seq_len}: loss {result['loss']:.4f} nats/token, "
        f"perplexity {result['ppl']:.3f}, {result['bpb']:.4f} bits/byte"
    )
    if by_position is not None:
        print("positions      loss (nats/token)")
        for row in result["position_bins"]:
            print(f"{row['first']:>6}-{row['last']:<7} {row['loss']:.4f}")
        if chart is not None:
            print(f"plot: {chart}")
    return 0


def _stream_eval(args: argparse.Namespace) -> int:
    """Token-by-token NLL over one long stream under each cache policy: a table of
    perplexity, ms/token and memory per segment, and with ``--out`` a chart and JSON."""
    import torch

    from longctx.data import encode_corpus
    from longctx.eval import plot_stream, stream_compare, stream_table
    from longctx.train.runs import load_run

    _, model, tokenizer, _ = load_run(args.run, args.checkpoint, args.weights)
    _need_tokenizer(tokenizer, args.run)
    tokens, _ = encode_corpus(args.data, tokenizer)
    ids = torch.as_tensor(tokens[: args.tokens], dtype=torch.long)
    policies = [p.strip() for p in args.cache.split(",") if p.strip()]
    results = stream_compare(model, ids, policies, sinks=args.sinks, window=args.window,
                             recall=_recall_args(args, policies), segment=args.segment, max_len=args.max_len,
                             recompute_every=args.recompute_every, progress=not args.quiet)
    if args.json:
        print(json.dumps({name: r.to_dict() for name, r in results.items()}))
    else:
        print(stream_table(results, "text"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps({n: r.to_dict() for n, r in results.items()}, indent=1))
        (out / "stream.md").write_text(stream_table(results, "markdown") + "\n")
        chart = plot_stream(results, out / "stream.png", title=f"{args.run}: {len(ids):,} tokens")
        print(f"wrote {out / 'stream.md'}, {out / 'stream.json'}" + (f", {chart}" if chart else ""), file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    from longctx.train.runs import import_run

    run = import_run(args.source, args.out)
    print(f"imported {args.source} into {run}; try: longctx info {run}")
    return 0


def weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=("fp32", "int8", "int4"), default="fp32",
                   help="linear layers' weights: fp32, or kept packed as int8 (per output channel) or int4 "
                        "(groups of 32 inputs) for faster decoding in less memory (default fp32)")


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return int(text)


def _cache_options(p: argparse.ArgumentParser) -> None:
    """--sinks and --window (sinks, window, recompute and recall), and recall's own options."""
    p.add_argument("--sinks", type=int, default=None,
                   help=f"sink tokens (default {DEFAULT_SINKS}; recall {RECALL_DEFAULTS['sinks']})")
    p.add_argument("--window", type=int, default=None,
                   help=f"recent tokens (default {DEFAULT_WINDOW}; recall {RECALL_DEFAULTS['window']})")
    recall = p.add_argument_group("recall cache (--cache recall: sinks, window and retrieved blocks, InfLLM)")
    recall.add_argument("--block-size", dest="block", type=_positive, metavar="N",
                        help=f"tokens per block (default {RECALL_DEFAULTS['block']})")
    recall.add_argument("--blocks", dest="topk", type=_positive, metavar="K",
                        help=f"blocks retrieved per step, top-k (default {RECALL_DEFAULTS['topk']})")
    recall.add_argument("--repr-tokens", dest="repr_tokens", type=_positive, metavar="N",
                        help=f"representative tokens per block (default {RECALL_DEFAULTS['repr_tokens']})")
    recall.add_argument("--memory-dir", dest="memory_dir", metavar="DIR",
                        help="keep the blocks in memory-mapped files under DIR (default: in RAM)")
    recall.add_argument("--recall-positions", dest="positions", choices=("fixed", "ordered"),
                        help="where retrieved keys sit for the query: all at the window's distance (fixed, "
                             f"InfLLM's) or in stream order before the window (ordered); default "
                             f"{RECALL_DEFAULTS['positions']}")


def _session_options(p: argparse.ArgumentParser) -> None:
    """The options of commands that run a model on a session: generate and chat."""
    p.add_argument("run", help="run directory, Hugging Face checkpoint directory, GGUF file or installed model name "
                               "(smollm2-135m)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--draft", default=None, metavar="{lookup,layers:K}",
                   help="speculative decoding: drafts from prompt lookup (n-grams of the text so far) or from "
                        "the model's first K layers and its head (layers:K, self-speculative), checked by the "
                        "whole model in one pass each; the same output as without (greedy) or the same "
                        "distribution (sampling); dense cache, attention models")
    p.add_argument("--draft-tokens", type=_positive, default=None, metavar="N",
                   help="tokens per draft (default: adaptive, 1-16)")
    p.add_argument("--checkpoint", help="a checkpoint name under RUN/checkpoints (default latest)")
    weights_option(p)
    p.add_argument("--cache", choices=CACHE_POLICIES, default="dense",
                   help="attention KV cache: every token (dense), the first --sinks plus the last --window "
                        "(sinks: StreamingLLM, constant memory however long), the last --window only (window), "
                        "or sinks, window and the blocks between them retrieved by relevance (recall: InfLLM)")
    _cache_options(p)
    p.add_argument("--save-state", metavar="FILE", help="save the session (caches, states, sampler) when done")
    p.add_argument("--load-state", metavar="FILE",
                   help="continue a saved session (give the --cache options it was made with)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a preset or TOML config")
    p.add_argument("--preset", help=f"preset name ({', '.join(preset_names())}); default tiny")
    p.add_argument("--config", help="TOML file applied over the preset")
    p.add_argument("--data", help="corpus: file, folder or glob (default: this Python's standard library)")
    p.add_argument("--out", default="runs/tiny", help="run directory (default runs/tiny)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="save a checkpoint and stop after STEP (continue later with --resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sequence-parallel", type=int, metavar="P",
                   help="split each sequence over P processes (launch with torchrun --nproc_per_node P)")
    p.set_defaults(func=_train, trains=True)


def _add_session_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run, printed as it comes")
    _session_options(p)
    p.add_argument("--prompt", default="", help="text to continue (after --load-state: new text, may be empty)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="-1: until eos or Ctrl-C")
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="a multi-turn session on one cache: a line from stdin per turn")
    _session_options(p)
    p.add_argument("--template", default=None,
                   help="text fed for each line, {prompt} standing for the line (default: the model's chat template "
                        "when its tokenizer has one, else 'USER: {prompt}\\n\\nASSISTANT: ')")
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument("--stop", default=None, help="end a reply when this text appears (e.g. 'USER:')")
    p.add_argument("--max-new-tokens", type=int, default=200, help="per reply")
    p.set_defaults(func=_chat)


def _add_eval_commands(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on a corpus")
    p.add_argument("run", help="run directory, Hugging Face checkpoint directory, GGUF file or installed model name")
    p.add_argument("--data", required=True, help="file, folder or glob")
    p.add_argument("--seq-len", type=int, default=None, help="context per window (default: training length)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--checkpoint", help="a checkpoint name under RUN/checkpoints (default latest)")
    weights_option(p)
    p.add_argument("--by-position", action="store_true",
                   help="also the loss at each position of the context (does more context help?), with a plot")
    p.add_argument("--plot", help="--by-position: where to write the plot (default RUN/loss_by_position.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_eval)

    p = sub.add_parser("stream-eval", help="perplexity over one long stream under KV-cache policies (StreamingLLM)")
    p.add_argument("run", help="run directory, Hugging Face checkpoint directory, GGUF file or installed model name")
    p.add_argument("--data", required=True, help="file, folder or glob; its documents make one stream")
    p.add_argument("--cache", default="sinks,recompute",
                   help="policies, comma-separated: dense, window, sinks, recall, recompute (attention models), "
                        "state (recurrent models); default sinks,recompute.  window and recompute use sinks + "
                        "window tokens in all, like sinks")
    _cache_options(p)
    p.add_argument("--tokens", type=int, default=None, help="stream only the first N tokens")
    p.add_argument("--segment", type=int, default=256, help="tokens per reported segment")
    p.add_argument("--max-len", type=int, default=None,
                   help="dense: stop after this many tokens (default: the length the model was trained for)")
    p.add_argument("--recompute-every", type=int, default=1, metavar="K",
                   help="recompute: evaluate every K-th prediction only (each re-encodes sinks + window tokens)")
    p.add_argument("--checkpoint", help="a checkpoint name under RUN/checkpoints (default latest)")
    weights_option(p)
    p.add_argument("--out", help="directory for stream.png (perplexity against position), stream.md, stream.json")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_stream_eval)


def _add_model_commands(sub) -> None:
    p = sub.add_parser("import", aliases=["import-hf"],
                       help="make a run from a Hugging Face checkpoint, a GGUF file or an installed model")
    p.add_argument("source", help="a Hugging Face checkpoint directory (config.json + safetensors), a .gguf file, "
                                  "or an installed model's name (smollm2-135m)")
    p.add_argument("out", help="run directory to create")
    p.set_defaults(func=_import)

    p = sub.add_parser("info", help="describe a run: architecture, parameters, training, checkpoints")
    p.add_argument("run", help="run directory, Hugging Face checkpoint directory, GGUF file or installed model name")
    p.add_argument("--json", action="store_true", help="everything as JSON, the full config included")
    p.set_defaults(func=info)


def _serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server on the model (``longctx.serve``), until Ctrl-C or SIGTERM."""
    try:
        from longctx.serve.app import run
    except ImportError as e:
        print(f"error: longctx serve needs FastAPI and uvicorn ({e}): pip install 'longctx[serve]'", file=sys.stderr)
        return 2
    from longctx.serve.engine import Engine
    from longctx.train.runs import load_run

    _, model, tokenizer, _ = load_run(args.run, args.checkpoint, args.weights)
    _need_tokenizer(tokenizer, args.run)
    cache = {"cache": args.cache, "sinks": args.sinks, "window": args.window, **_recall_args(args, [args.cache])}
    engine = Engine(model, tokenizer, cache, sessions_dir=args.sessions_dir, max_queue=args.max_queue,
                    max_batch=args.max_batch, draft=args.draft)
    model_id = Path(args.run).name or str(args.run)
    print(f"serving {args.run} as model {model_id!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    run(engine, model_id, host=args.host, port=args.port, api_key=args.api_key)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streamed; sessions)")
    p.add_argument("run", help="run directory, Hugging Face checkpoint directory, GGUF file or installed model name "
                               "(smollm2-135m)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--sessions-dir", metavar="DIR", default=None,
                   help="keep named sessions (the request field 'session') in DIR, one safetensors file each; "
                        "without it requests naming a session are refused")
    p.add_argument("--max-queue", type=_positive, default=16, metavar="N",
                   help="requests waiting for the model beyond which the server answers 429 (default 16)")
    p.add_argument("--max-batch", type=_positive, default=8, metavar="N",
                   help="requests decoded together, one batched step per token (continuous batching; default 8)")
    p.add_argument("--draft", choices=("lookup",), default=None,
                   help="decode speculatively with this draft (lookup: prompt n-grams; dense cache) unless a request "
                        "says 'draft': 'none'; greedy output is unchanged (default: only requests asking for it)")
    p.add_argument("--checkpoint", help="a checkpoint name under RUN/checkpoints (default latest)")
    weights_option(p)
    p.add_argument("--cache", choices=CACHE_POLICIES, default="dense",
                   help="attention KV cache of every request and session, as for generate (dense, sinks, window, "
                        "recall)")
    _cache_options(p)
    p.set_defaults(func=_serve)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``longctx`` parser; ``argv`` (the arguments it will parse) says whether the
    synthetic-task commands' option lists are needed (they load the task definitions)."""
    parser = argparse.ArgumentParser(prog="longctx", description="Train, run and measure long-context models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_session_commands(sub)
    _add_eval_commands(sub)
    _add_model_commands(sub)
    _add_serve(sub)
    add_task_commands(sub, detailed=any(a in ("task", "compare") for a in (argv or [])[:1]))
    return parser




def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        import torch

        with torch.inference_mode(not getattr(args, "trains", False)):
            return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

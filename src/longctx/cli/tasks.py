"""``longctx task train|eval`` and ``longctx compare``: synthetic long-context tasks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _memory(text: str | None) -> int | None:
    """``"8G"``, ``"512M"``, ``"1.5GiB"`` or bytes."""
    if text is None:
        return None
    from longctx.model import ConfigError

    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale != 1 else s) * scale
    except ValueError:
        raise ConfigError(f"cannot read memory size {text!r}; use e.g. 8G or 512M") from None
    if value <= 0:
        raise ConfigError(f"memory size must be positive; got {text!r}")
    return int(value)


def _task_train(args: argparse.Namespace) -> int:
    from longctx.model import ConfigError
    from longctx.train.tasks import ARCHS, TASK_NAMES, TaskConfig, apply_overrides, read_task_config, train_task

    if args.resume:
        saved, _ = read_task_config(args.out)
        values = saved.to_dict()
        for name in ("task", "arch"):
            given = getattr(args, name)
            if given is not None and given != values[name]:
                raise ConfigError(f"{args.out} is a run of {name} {values[name]!r}, not {given!r}; resume it "
                                  "without --" + name + " or start a new run with another --out")
    else:
        if args.task is None or args.arch is None:
            raise ConfigError(f"task train needs --task ({', '.join(TASK_NAMES)}) and --arch "
                              f"({', '.join(ARCHS)})")
        values = {"task": args.task, "arch": args.arch}
    for name in ("train_len", "steps", "batch_size", "lr", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    cfg = TaskConfig.from_dict(apply_overrides(values, args.set))
    result = train_task(cfg, args.out, resume=args.resume, budget_minutes=args.budget_minutes,
                        stop_at=args.stop_at, progress=not args.quiet, log=_err)
    acc = "-" if result.val_accuracy is None else f"{result.val_accuracy:.3f}"
    print(f"{cfg.task} / {cfg.arch}: step {result.step}/{cfg.steps}, accuracy at length {cfg.train_len}: {acc}, "
          f"{result.parameters:,} parameters, {result.train_seconds:.0f} s of training "
          f"({result.tokens_per_s:,.0f} tokens/s); run saved in {args.out}")
    return 130 if result.interrupted else 0


def _eval_options(args: argparse.Namespace) -> dict:
    options = {"examples": args.examples, "batch": args.batch, "max_memory": _memory(args.max_memory),
               "budget_seconds": None if args.budget_minutes is None else args.budget_minutes * 60.0}
    if getattr(args, "chunk", None) is not None:
        options["chunk"] = args.chunk
    return options


def _text_tasks(args: argparse.Namespace) -> list[str] | None:
    """The text tasks named by ``--task`` (a comma list), or None for a synthetic task run."""
    from longctx.data.text_tasks import TEXT_TASKS
    from longctx.model import ConfigError

    names = [] if args.task is None else [t.strip() for t in args.task.split(",") if t.strip()]
    text = [t for t in names if t in TEXT_TASKS]
    if not text:
        return None
    if len(text) != len(names):
        raise ConfigError(f"--task mixes text tasks ({', '.join(TEXT_TASKS)}) with {', '.join(set(names) - set(text))}; "
                          "evaluate a synthetic task run and a pretrained model separately")
    return text


def _retrieval_eval(args: argparse.Namespace, tasks: list[str]) -> int:
    """``task eval MODEL --task niah,...``: a pretrained model on the text tasks by length,
    depth and cache policy (``longctx.eval.retrieval``)."""
    from longctx.eval.retrieval import DEPTHS, evaluate_retrieval, parse_policies, results_markdown
    from longctx.eval.tasks import parse_lengths
    from longctx.model import ConfigError
    from longctx.train.runs import load_run

    if args.lengths is None:
        raise ConfigError("text tasks need --lengths, e.g. 1k,2k,...,16k")
    if args.checkpoint is not None:
        raise ConfigError("--checkpoint picks a checkpoint of a task run; give the model path or name instead")
    policies = parse_policies(args.cache)
    _, model, tokenizer, _ = load_run(args.run, None, args.weights)
    if tokenizer is None:
        raise ConfigError(f"{args.run} has no tokenizer, which the text tasks need")
    options = _eval_options(args)
    options["depths"] = DEPTHS if args.depths is None else [float(d) for d in args.depths.split(",") if d.strip()]
    out = Path(args.out or f"runs/retrieval-{Path(str(args.run)).stem}")
    results = evaluate_retrieval(model, tokenizer, tasks, parse_lengths(args.lengths), policies, seed=args.seed,
                                 out_dir=out, model_name=str(args.run), log=None if args.json else _err, **options)
    if args.json:
        print(json.dumps({task: {label: {n: cell["accuracy"] for n, cell in cells.items()}
                                 for label, cells in entry["cells"].items()}
                          for task, entry in results["tasks"].items()}))
    else:
        print(results_markdown(results))
        print(f"results, report and heatmaps in {out}")
    return 0


def _task_eval(args: argparse.Namespace) -> int:
    from longctx.eval.report import accuracy_table, depth_table
    from longctx.eval.tasks import parse_lengths
    from longctx.train.tasks import evaluate_run

    text = _text_tasks(args)
    if args.examples is None:
        args.examples = 5 if text else 100
    if args.batch is None:
        args.batch = 1 if text else 8
    if text:
        return _retrieval_eval(args, text)
    for flag, given in (("--cache", args.cache != DEFAULT_POLICIES), ("--out", args.out is not None),
                        ("--weights", args.weights != "fp32")):
        if given:
            from longctx.model import ConfigError

            raise ConfigError(f"{flag} applies to text tasks of pretrained models (--task niah, ...), not to a "
                              "synthetic task run")
    lengths = None if args.lengths is None else parse_lengths(args.lengths)
    options = _eval_options(args)
    if args.depths is not None:
        options["depths"] = [float(d) for d in args.depths.split(",") if d.strip()]
    options["seed"] = args.seed
    result = evaluate_run(args.run, lengths, task=args.task, checkpoint=args.checkpoint,
                          log=None if args.json else _err, **options)
    lengths = sorted(result["accuracy"])
    if args.json:
        out = {"task": result["task"], "accuracy": {str(k): v for k, v in result["accuracy"].items()},
               "arch": result["arch"], "train_len": result["train_len"], "examples": result["examples"],
               "chance": result["chance"], "seconds": {str(k): v for k, v in result["seconds"].items()},
               "run": result["run"], "checkpoint": result["checkpoint"]}
        if "by_depth" in result:
            out["by_depth"] = {str(k): {str(d): v for d, v in cell.items()} for k, cell in result["by_depth"].items()}
        print(json.dumps(out))
        return 0
    row = {"label": result["arch"], "accuracy": result["accuracy"]}
    print(f"{result['task']} ({result['run']}, {result['checkpoint']}), {result['examples']} examples per length, "
          f"chance {100 * result['chance']:.1f}%; accuracy (%):")
    print(accuracy_table([row], lengths, train_len=result["train_len"]))
    if "by_depth" in result:
        print("\nby depth of the pass key (%):")
        print(depth_table(result["by_depth"], lengths))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from longctx.eval.tasks import parse_lengths
    from longctx.train.tasks import compare

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    lengths = None if args.lengths is None else parse_lengths(args.lengths)
    result = compare(args.task, archs, args.out, lengths=lengths, budget_minutes=args.budget_minutes,
                     eval_minutes=args.eval_minutes, overrides=args.set, train_len=args.train_len, steps=args.steps,
                     examples=args.examples, eval_batch=args.batch, max_memory=_memory(args.max_memory),
                     progress=not args.quiet, log=_err)
    print(Path(result["paths"]["report"]).read_text())
    print(f"report: {result['paths']['report']}")
    return 0


def _eval_arguments(p: argparse.ArgumentParser, examples: int | None = None) -> None:
    """Options shared by task eval and compare; ``examples`` None: task eval picks per kind."""
    p.add_argument("--lengths", help="comma-separated lengths; '256,512,...,65536' doubles up to the last; "
                                     "default: the task's standard lengths")
    p.add_argument("--examples", type=int, default=examples,
                   help=f"examples per length (default {examples})" if examples else
                   "examples per length (default 100), per depth and length for text tasks (default 5)")
    p.add_argument("--batch", type=int, default=8 if examples else None,
                   help="examples per forward pass (lowered to fit --max-memory; default 8, text tasks 1)")
    p.add_argument("--max-memory", help="memory limit of one evaluation, e.g. 8G (default: half the available "
                                        "memory, at most 8G); longer lengths are reported 'out of memory'")


DEFAULT_POLICIES = "dense,sinks,recall"
_TASK_HELP = "synthetic long-context tasks: train a small model, evaluate by length"
_COMPARE_HELP = "train and evaluate several architectures on a task; write a report"


def add_task_commands(sub, detailed: bool = True) -> None:
    """Register ``task`` (``train``, ``eval``) and ``compare`` on the main parser's subparsers.
    Their option lists name the tasks and architectures, which loads the task definitions
    (torch): ``detailed=False`` registers the commands with their one-line help only, for
    invocations of other commands."""
    if not detailed:
        sub.add_parser("task", help=_TASK_HELP)
        sub.add_parser("compare", help=_COMPARE_HELP)
        return
    from longctx.data.text_tasks import TEXT_TASKS
    from longctx.train.tasks import ARCHS, COMPARED_ARCHS, TASK_NAMES

    tasks, archs = ", ".join(TASK_NAMES), ", ".join(ARCHS)

    task = sub.add_parser("task", help=_TASK_HELP)
    task_sub = task.add_subparsers(dest="task_command", required=True)

    p = task_sub.add_parser("train", help="train a small model of one architecture on a synthetic task")
    p.add_argument("--task", help=f"one of {tasks}")
    p.add_argument("--arch", "--preset", dest="arch", help=f"architecture: {archs} (--preset is its old name)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--train-len", type=int, help="training sequence length (default: the task's)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the task's)")
    p.add_argument("--batch-size", type=int, help="examples per step (default: the task's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the task's)")
    p.add_argument("--seed", type=int, help="seed of the weights and the training data (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="task.KEY=V (options: vocab, n_tokens, pairs, digits; fields: warmup, eval_every, ...) or "
                        "model.KEY=V (e.g. model.ssm_state=64); repeatable")
    p.add_argument("--budget-minutes", type=float, help="stop (saving a checkpoint) when training time runs out")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="save and stop after STEP (continue with --resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_task_train, trains=True)

    p = task_sub.add_parser("eval", help="accuracy of a task run, or of a pretrained model on text retrieval "
                                         "tasks, at many lengths")
    p.add_argument("run", help="run directory of longctx task train; for text tasks any model: a run, Hugging Face "
                               "or GGUF path, or an installed model's name (smollm2-135m)")
    _eval_arguments(p)
    p.add_argument("--depths", help="passkey: depths of the note, e.g. 0,0.25,0.5,0.75,1 (the default); text "
                                    "tasks: depths of the needle (default 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--task", help=f"refuse a run of another task; or text tasks of a pretrained model, comma-"
                                  f"separated: {', '.join(TEXT_TASKS)}")
    p.add_argument("--cache", default=DEFAULT_POLICIES,
                   help="text tasks: cache policies, comma-separated, each NAME[:key=value...] with init_state's "
                        "options, e.g. dense,sinks:window=1020,recall:topk=16:memory_dir=mem; dense:rope=yarn "
                        f"scales RoPE beyond the trained length (default {DEFAULT_POLICIES})")
    p.add_argument("--out", help="text tasks: directory of results.json, report.md and heatmaps; cells already "
                                 "there with the same settings are not run again (default runs/retrieval-MODEL)")
    p.add_argument("--weights", choices=("fp32", "int8", "int4"), default="fp32",
                   help="text tasks: the model's linear weights (default fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation examples")
    p.add_argument("--chunk", type=int, help="tokens per forward pass of the chunked path (default 4096)")
    p.add_argument("--budget-minutes", type=float, help="evaluation time limit: lengths beyond it are 'over budget'")
    p.add_argument("--checkpoint", help="a checkpoint name under RUN/checkpoints (default latest)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"task": ..., "accuracy": {...}}')
    p.set_defaults(func=_task_eval)

    p = sub.add_parser("compare", help=_COMPARE_HELP)
    p.add_argument("--task", required=True, help=f"one of {tasks}")
    p.add_argument("--archs", "--presets", dest="archs", default=",".join(COMPARED_ARCHS),
                   help=f"comma-separated from {archs} (s4d: time-invariant mamba); NAME:key=value adds "
                        "model or training overrides to one (mamba:ssm_state=4:lr=0.003); "
                        f"default {','.join(COMPARED_ARCHS)} (--presets is its old name)")
    p.add_argument("--out", required=True, help="directory for the report and one run per architecture")
    p.add_argument("--train-len", type=int, help="training length (default: the task's)")
    p.add_argument("--steps", type=int, help="training steps of each architecture (default: the task's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="task.KEY=V or model.KEY=V for every architecture; repeatable")
    p.add_argument("--budget-minutes", type=float, help="training time limit of each architecture")
    p.add_argument("--eval-minutes", type=float, default=10.0,
                   help="evaluation time limit of each architecture (default 10): longer lengths are 'over budget'")
    _eval_arguments(p, examples=100)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_compare, trains=True)

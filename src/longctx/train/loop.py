"""The training loop: data, model, optimizer, validation, checkpoints, resume.

Exact resume: the batch of step ``s`` is drawn from a generator seeded by
``(train.seed, s)``, so the data position is the step itself; weights, optimizer and the
global RNG come back from the checkpoint.  A resumed run follows the same loss curve as
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longctx.data import (
    BPETokenizer,
    ByteTokenizer,
    TokenDataset,
    load_tokenizer,
    prepare_dataset,
    read_documents,
    resolve_corpus,
    save_tokenizer,
)
from longctx.eval.perplexity import evaluate_loss, unigram_bits_per_byte
from longctx.generation import generate_text
from longctx.model import ConfigError, LanguageModel
from longctx.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_run_config,
    save_checkpoint,
    write_json_atomic,
)
from longctx.train.config import RunConfig
from longctx.train.metrics import MetricsLog, plot_loss
from longctx.train.optim import lr_at, make_optimizer
from longctx.train.parallel import sequence_parallel_from


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    val: dict[str, float] | None
    unigram_bpb: float
    sample: str | None


def _tokenizer(cfg: RunConfig, run_dir: Path, resume: bool, log: Callable[[str], None]):
    if resume:
        return load_tokenizer(run_dir)
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    log(f"training a BPE tokenizer with {cfg.data.bpe_vocab_size} tokens on the corpus")
    texts = (text for _, text in read_documents(resolve_corpus(cfg.data.path or None)))
    return BPETokenizer.train(texts, cfg.data.bpe_vocab_size)


def _batch_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@contextlib.contextmanager
def _stop_on_signal():
    """Turn SIGINT/SIGTERM into a flag checked between steps, so an interrupted run saves
    a checkpoint instead of dying mid-step.  A second signal stops at once."""
    flag = {"stop": False}
    previous = {}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers, no graceful stop
        pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a run; on resume, refuse settings that would change its course.

    A directory with a config but no checkpoint (a run that failed before its first save)
    may be started afresh.
    """
    if not resume:
        if list_checkpoints(run_dir):
            raise ConfigError(
                f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out"
            )
        return
    saved = read_run_config(run_dir)
    if latest_checkpoint(run_dir) is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from; train without --resume")
    new = cfg.to_dict()
    changed = [f"[{section}]" for section in ("model", "data") if saved.get(section) != new[section]]
    if saved.get("train", {}).get("seed") != new["train"]["seed"]:
        changed.append("train.seed")
    if changed:
        raise ConfigError(
            f"{', '.join(changed)} differ from the settings {run_dir} was trained with, which would change "
            "the model or its data; resume without changing them, or start a new run with another --out"
        )


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; with ``resume`` continue from its latest checkpoint.

    ``stop_at`` saves a checkpoint and returns after that step (the schedule still runs to
    ``train.steps``): for time-sliced jobs.
    """
    run_dir = Path(run_dir)
    tc = cfg.train
    sp = sequence_parallel_from(tc)
    if sp is None:
        return _train(cfg, run_dir, resume, stop_at, progress, log, None)
    try:
        with sp.failures_named():
            # Rank 0 alone writes files and reports.
            if sp.rank:
                progress, log = False, lambda message: None
            return _train(cfg, run_dir, resume, stop_at, progress, log, sp)
    finally:
        sp.close()


def _train(cfg: RunConfig, run_dir: Path, resume: bool, stop_at, progress: bool, log, sp) -> TrainResult:
    main = sp is None or sp.rank == 0
    tc = cfg.train
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    prepare_run_dir(cfg, run_dir, resume)
    if sp is not None:
        sp.check_length(tc.seq_len)
        if not main:  # the tokenizer and the token cache come from rank 0
            sp.barrier()

    tokenizer = _tokenizer(cfg, run_dir, resume, log) if main or cfg.data.tokenizer == "byte" or resume \
        else load_tokenizer(run_dir)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        # A larger embedding than the tokenizer needs is fine (unused rows); smaller is not.
        if resume:
            raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} < tokenizer's {tokenizer.vocab_size}")
        log(f"model.vocab_size set to the tokenizer's {tokenizer.vocab_size} (config had {cfg.model.vocab_size})")
        cfg.model.vocab_size = tokenizer.vocab_size
    dataset = prepare_dataset(cfg.data.path or None, tokenizer, val_fraction=cfg.data.val_fraction, progress=progress)
    train_ds, val_ds = TokenDataset(dataset, "train"), TokenDataset(dataset, "val")
    if main and not resume:
        save_tokenizer(tokenizer, run_dir)
    if sp is not None and main:
        sp.barrier()
    token_bytes = tokenizer.token_bytes()
    unigram = unigram_bits_per_byte(
        train_ds.tokens(), val_ds.tokens(), token_bytes, tokenizer.vocab_size
    )
    log(
        f"data: {len(train_ds):,} train tokens, {len(val_ds):,} validation tokens "
        f"({val_ds.n_documents} documents); unigram baseline {unigram:.3f} bits/byte"
    )

    torch.manual_seed(tc.seed)
    model = LanguageModel(cfg.model)
    optimizer = make_optimizer(model, tc)
    step = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        step = load_checkpoint(ckpt, model, optimizer)["step"]
        log(f"resumed from {ckpt} at step {step}")
    if main:
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume else None) if main else None
    if sp is not None:
        model = sp.parallelize(model)
        log(f"sequence parallel: each sequence split over {sp.world} processes ({sp.layout} layout)")
    log(
        f"model: {model.num_parameters():,} parameters ({', '.join(sorted(set(cfg.model.layers)))}); "
        f"{tc.steps} steps of {tc.batch_size * tc.grad_accum} x {tc.seq_len} tokens"
    )

    def shard(x):
        return x if sp is None else sp.shard(x)

    def validate() -> dict[str, float]:
        windows = ((shard(x), shard(y)) for x, y in val_ds.windows(tc.seq_len, tc.batch_size, tc.eval_batches))
        result = evaluate_loss(model, windows, token_bytes, total=None if sp is None else sp.sum)
        if main:
            metrics.write({"step": step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                           "val_ppl": result["ppl"]})
        return result

    def checkpoint() -> None:
        if main:
            save_checkpoint(run_dir, step, model, optimizer, {"seed": tc.seed, "data_position": step},
                            tc.keep_checkpoints)

    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    tokens_per_step = tc.batch_size * tc.grad_accum * tc.seq_len
    val = None
    interrupted = False
    model.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    with _stop_on_signal() as stop_flag:
        while step < end:
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = _batch_generator(tc.seed, step)
            loss_sum = 0.0
            for _ in range(tc.grad_accum):
                x, y = train_ds.sample_batch(tc.batch_size, tc.seq_len, generator)
                logits = model(shard(x))
                # Mean over the whole batch's tokens: with a split sequence, each rank's sum
                # over its tokens / all tokens; the ranks' gradients add up to the mean's.
                loss = F.cross_entropy(logits.flatten(0, 1).float(), shard(y).flatten(), reduction="sum") / y.numel()
                (loss / tc.grad_accum).backward()
                loss_sum += float(loss.detach())
            if sp is not None:
                sp.all_reduce_gradients(model)
                loss_sum = sp.sum([loss_sum])[0]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            train_loss = loss_sum / tc.grad_accum
            if not math.isfinite(train_loss):
                last = latest_checkpoint(run_dir) if list_checkpoints(run_dir) else None
                raise FloatingPointError(
                    f"training loss became {train_loss} at step {step}; lower train.lr or raise "
                    "train.warmup_steps" + (f" (last good checkpoint: {last})" if last else "")
                )
            bar.update(1)
            if main and (step % tc.log_every == 0 or step == end):
                elapsed = time.perf_counter() - window_start
                tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                metrics.write({"step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                               "tokens": step * tokens_per_step, "tokens_per_s": tok_s})
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if step % tc.eval_every == 0 or step == tc.steps:
                val = validate()
                if main:
                    bar.write(f"step {step}: val loss {val['loss']:.4f}, {val['bpb']:.3f} bits/byte "
                              f"(unigram {unigram:.3f})")
            if stop_flag["stop"] if sp is None else sp.any(stop_flag["stop"]):  # all ranks stop together
                interrupted = True
                break
            if step % tc.save_every == 0 or step == end:
                checkpoint()
    bar.close()
    if interrupted:
        checkpoint()
        log(f"interrupted at step {step}; checkpoint saved. Continue with: longctx train --out {run_dir} --resume")
        return TrainResult(step, True, val, unigram, None)

    sample = None
    if main and step == tc.steps and val is not None:  # skip when a finished run was resumed
        if sp is not None:  # sampling runs on a plain single-process copy
            plain = LanguageModel(cfg.model)
            plain.load_state_dict(model.state_dict())
            model = plain.eval()
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", unigram)
        write_json_atomic(run_dir / "summary.json", {
            "step": step, "val": val, "unigram_bpb": unigram, "parameters": model.num_parameters(),
        })
        if cfg.sample.max_new_tokens:
            sample = generate_text(model, tokenizer, cfg.sample.prompt, cfg.sample.max_new_tokens,
                                 temperature=cfg.sample.temperature, top_k=cfg.sample.top_k,
                                 top_p=cfg.sample.top_p, seed=cfg.sample.seed)
    return TrainResult(step, False, val, unigram, sample)


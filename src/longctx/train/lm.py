"""Language-model runs (``longctx train``): data, model, optimizer, validation, checkpoints,
resume, on the shared loop (``longctx.train.loop``).

Exact resume: the batch of step ``s`` is drawn from a generator seeded by
``(train.seed, s)``, so the data position is the step itself; weights, optimizer and the
global RNG come back from the checkpoint.  A resumed run follows the same loss curve as
an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

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
    latest_checkpoint,
    load_checkpoint,
    read_run_config,
    save_checkpoint,
    write_json_atomic,
)
from longctx.train.config import RunConfig
from longctx.train.loop import LoopSettings, StepOutput, Window, prepare_run_dir, run_loop
from longctx.train.metrics import MetricsLog, plot_loss
from longctx.train.optim import make_optimizer
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


def _changed_settings(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Settings a resume may not change: the model, the data and the seed."""
    saved, new = read_run_config(run_dir), cfg.to_dict()
    changed = [f"[{section}]" for section in ("model", "data") if saved.get(section) != new[section]]
    if saved.get("train", {}).get("seed") != new["train"]["seed"]:
        changed.append("train.seed")
    return changed


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
    sp = sequence_parallel_from(cfg.train)
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


class _LanguageModelRun:
    """The loop's hooks for a language-model run (``LoopHooks``)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, model, optimizer, train_ds, val_ds, token_bytes, unigram, sp,
                 metrics: MetricsLog | None) -> None:
        self.cfg, self.run_dir, self.model, self.optimizer = cfg, run_dir, model, optimizer
        self.train_ds, self.val_ds, self.token_bytes, self.unigram = train_ds, val_ds, token_bytes, unigram
        self.sp, self.metrics = sp, metrics
        self.main = sp is None or sp.rank == 0
        self.val: dict[str, float] | None = None

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.sp is None else self.sp.shard(x)

    def train_step(self, step: int) -> StepOutput:
        tc = self.cfg.train
        generator = _batch_generator(tc.seed, step)
        loss_sum = 0.0
        for _ in range(tc.grad_accum):
            x, y = self.train_ds.sample_batch(tc.batch_size, tc.seq_len, generator)
            logits = self.model(self.shard(x))
            # Mean over the whole batch's tokens: with a split sequence, each rank's sum
            # over its tokens / all tokens; the ranks' gradients add up to the mean's.
            loss = F.cross_entropy(logits.flatten(0, 1).float(), self.shard(y).flatten(), reduction="sum") / y.numel()
            (loss / tc.grad_accum).backward()
            loss_sum += float(loss.detach())
        if self.sp is not None:
            self.sp.all_reduce_gradients(self.model)
            loss_sum = self.sp.sum([loss_sum])[0]
        return StepOutput(loss_sum / tc.grad_accum, tc.batch_size * tc.grad_accum * tc.seq_len)

    def log(self, step: int, window: Window) -> dict[str, str]:
        loss, tok_s = window.last.loss, window.tokens_per_s
        if self.main:
            self.metrics.write({"step": step, "loss": loss, "lr": window.lr, "grad_norm": window.grad_norm,
                                "tokens": step * window.last.tokens, "tokens_per_s": tok_s})
        return {"loss": f"{loss:.3f}", "tok_s": f"{tok_s:,.0f}"}

    def validate(self, step: int) -> str | None:
        tc = self.cfg.train
        windows = ((self.shard(x), self.shard(y)) for x, y in self.val_ds.windows(tc.seq_len, tc.batch_size,
                                                                                    tc.eval_batches))
        self.val = evaluate_loss(self.model, windows, self.token_bytes, total=None if self.sp is None else self.sp.sum)
        if not self.main:
            return None
        self.metrics.write({"step": step, "val_loss": self.val["loss"], "val_bpb": self.val["bpb"],
                            "val_ppl": self.val["ppl"]})
        return f"step {step}: val loss {self.val['loss']:.4f}, {self.val['bpb']:.3f} bits/byte (unigram {self.unigram:.3f})"

    def save(self, step: int, compute_seconds: float) -> None:
        """A checkpoint, and the loss curve and summary so far (an interrupted run keeps them)."""
        if self.main:
            save_checkpoint(self.run_dir, step, self.model, self.optimizer, {"seed": self.cfg.train.seed,
                            "data_position": step}, self.cfg.train.keep_checkpoints)
            self.write_summary(step)

    def write_summary(self, step: int) -> None:
        plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", self.unigram)
        write_json_atomic(self.run_dir / "summary.json", {
            "step": step, "steps": self.cfg.train.steps, "val": self.val, "unigram_bpb": self.unigram,
            "parameters": self.model.num_parameters(),
        })


def _train(cfg: RunConfig, run_dir: Path, resume: bool, stop_at, progress: bool, log, sp) -> TrainResult:
    main = sp is None or sp.rank == 0
    tc = cfg.train
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    prepare_run_dir(run_dir, resume, lambda: _changed_settings(cfg, run_dir))
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
    unigram = unigram_bits_per_byte(train_ds.tokens(), val_ds.tokens(), token_bytes, tokenizer.vocab_size)
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

    run = _LanguageModelRun(cfg, run_dir, model, optimizer, train_ds, val_ds, token_bytes, unigram, sp, metrics)
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    outcome = run_loop(model, optimizer, run, LoopSettings(
        tc, step, end, progress=progress, any_rank=bool if sp is None else sp.any, run_dir=run_dir))
    step = outcome.step
    if outcome.interrupted:
        log(f"interrupted at step {step}; checkpoint saved. Continue with: longctx train --out {run_dir} --resume")
        return TrainResult(step, True, run.val, unigram, None)

    sample = None
    if main and step == tc.steps and run.val is not None:  # skip when a finished run was resumed
        if sp is not None:  # sampling runs on a plain single-process copy
            plain = LanguageModel(cfg.model)
            plain.load_state_dict(model.state_dict())
            model = plain.eval()
        if cfg.sample.max_new_tokens:
            sample = generate_text(model, tokenizer, cfg.sample.prompt, cfg.sample.max_new_tokens,
                                   temperature=cfg.sample.temperature, top_k=cfg.sample.top_k,
                                   top_p=cfg.sample.top_p, seed=cfg.sample.seed)
    return TrainResult(step, False, run.val, unigram, sample)

"""Models from any source, in one place: a run directory, a Hugging Face checkpoint
directory, a GGUF file or the name of an installed model (``load_run``); and a run made
from an imported model (``import_run``).  Every command, evaluation and server loads
through here."""

from __future__ import annotations

import json
from pathlib import Path

from longctx.data import DataError, HFTokenizer, load_tokenizer, save_tokenizer
from longctx.model import LanguageModel
from longctx.model.config import ConfigError
from longctx.layers.quantized import quantize_model
from longctx.model.installed import installed_model_path, is_model_name
from longctx.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    read_run_config,
    save_checkpoint,
    write_json_atomic,
)
from longctx.train.config import RunConfig


def is_hf_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint directory (its config.json has a model_type)."""
    config = Path(path) / "config.json"
    try:
        values = json.loads(config.read_text()) if config.is_file() else {}
    except json.JSONDecodeError:
        return False
    return isinstance(values, dict) and "model_type" in values and "model" not in values


def load_hf_checkpoint(hf_dir: str | Path):
    """A Hugging Face checkpoint directory as ``load_run`` returns a run: the model, and the
    tokenizer saved beside it (None without a tokenizer.json)."""
    from longctx.model.hf import from_hf

    hf_dir = Path(hf_dir)
    model = from_hf(hf_dir)
    model.eval()
    tokenizer = HFTokenizer.load(hf_dir) if (hf_dir / "tokenizer.json").is_file() else None
    return RunConfig(model=model.config), model, tokenizer, hf_dir


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_gguf(path: str | Path):
    """A GGUF file (``longctx.model.gguf``) as ``load_run`` returns a run."""
    from longctx.model.gguf import from_gguf

    model, tokenizer = from_gguf(path)
    return RunConfig(model=model.config), model, tokenizer, Path(path)


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, weights: str = "fp32"):
    """The model of ``run_dir``: ``(RunConfig, LanguageModel in eval mode, tokenizer or None, path)``.

    ``run_dir`` is a run directory (``checkpoint`` picks one under ``RUN/checkpoints``, a
    ``step_*`` name or a path; default the latest), a Hugging Face checkpoint directory, a
    GGUF file, or the name of an installed model (``longctx.model.installed``, e.g.
    ``smollm2-135m``).  ``weights`` ``int8`` or ``int4`` keeps the linear layers' weights
    packed (``longctx.layers.quantized``) for faster, smaller inference.
    """
    cfg, model, tokenizer, path = _load(run_dir, checkpoint)
    return cfg, quantize_model(model, weights), tokenizer, path


def _load(run_dir: str | Path, checkpoint: str | Path | None):
    if is_model_name(run_dir) or is_gguf_file(run_dir):
        if checkpoint is not None:
            raise CheckpointError(f"{run_dir} is a model file, not a run: it has no --checkpoint choice")
        return load_gguf(installed_model_path(run_dir) if is_model_name(run_dir) else run_dir)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "GGUF file" if run_dir.suffix == ".gguf" else "run directory"
        raise CheckpointError(f"{what} {run_dir} does not exist")
    if is_hf_checkpoint(run_dir):
        if checkpoint is not None:
            raise CheckpointError(f"{run_dir} is a Hugging Face checkpoint, not a run: it has no --checkpoint choice")
        return load_hf_checkpoint(run_dir)
    values = read_run_config(run_dir)
    from longctx.train.tasks.config import RUN_KIND as TASK_RUN

    if values.get("kind") == TASK_RUN:
        raise ConfigError(f"{run_dir} is a synthetic-task run (longctx task train), not a language-model run; "
                          f"evaluate it with: longctx task eval {run_dir}")
    cfg = RunConfig.from_dict(values)
    if checkpoint is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first (longctx train --out {run_dir})")
    else:
        path = Path(checkpoint)
        if not path.is_dir():
            path = checkpoint_dir(run_dir) / str(checkpoint)
        if not path.is_dir():
            names = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
            raise CheckpointError(f"no checkpoint {checkpoint!r} in {run_dir}; available: {names}")
    # An imported checkpoint may come without a tokenizer: weights-only work still runs.
    tokenizer = load_tokenizer(run_dir) if (run_dir / "tokenizer_config.json").exists() else None
    model = LanguageModel(cfg.model)
    load_model_weights(model, path / "model.safetensors")
    model.eval()
    return cfg, model, tokenizer, path


def import_run(source: str | Path, run_dir: str | Path) -> Path:
    """Make a run directory from a Hugging Face checkpoint directory, a GGUF file or an
    installed model's name, so ``generate``, ``eval`` and ``info`` work on it without the
    source.  Its tokenizer (and chat template) comes along."""
    run_dir = Path(run_dir)
    if list_checkpoints(run_dir) or (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another output directory")
    note = "none (generate and eval need one: put a tokenizer.json beside the checkpoint)"
    if is_model_name(source) or is_gguf_file(source):
        _, model, tokenizer, path = load_run(source)
    else:
        path = Path(source)
        if not path.is_dir():
            raise CheckpointError(f"{source} is neither a Hugging Face checkpoint directory, a GGUF file, nor an "
                                  "installed model's name")
        from longctx.model.hf import from_hf

        model, tokenizer = from_hf(path), None
        if (path / "tokenizer.json").is_file():
            try:
                tokenizer = HFTokenizer.load(path)
            except DataError as e:
                note = f"not usable: {e}"
    if tokenizer is not None:
        save_tokenizer(tokenizer, run_dir)
        note = "tokenizer.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", RunConfig(model=model.config).to_dict())
    save_checkpoint(run_dir, 0, model, None, {"imported_from": str(Path(path).resolve()), "tokenizer": note})
    return run_dir

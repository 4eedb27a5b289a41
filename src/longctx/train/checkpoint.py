"""Checkpoints in a run directory: weights and optimizer in safetensors, trainer state in
JSON, each written to a temporary directory and renamed into place (atomic).

Layout::

    RUN/config.json                      the resolved RunConfig
    RUN/checkpoints/step_000200/         model.safetensors, optimizer.safetensors, trainer.json
    RUN/checkpoints/latest               name of the newest complete checkpoint

A crash mid-write leaves only a ``.tmp-*`` directory, never a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from longctx.validation import read_json_file


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = checkpoint_dir(Path(run_dir)) / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if not name.startswith("step_") or not path.is_dir():
        available = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a checkpoint here (available: {available}); "
            "write the name of one of them into that file"
        )
    return path


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (by step number, not by name)."""
    root = checkpoint_dir(Path(run_dir))
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=_step_of)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split the optimizer state into tensors (safetensors) and the rest (JSON)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    keep: int = 2,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/step_{step}`` atomically, point ``latest`` at it, prune old ones.

    Without an optimizer (an imported model) only weights and trainer state are written.
    ``extra_tensors`` (training state beside the weights, e.g. carried recurrent states) go
    to ``extra.safetensors``; ``load_extra_tensors`` reads them back."""
    root = checkpoint_dir(Path(run_dir))
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_model_weights(model, tmp / "model.safetensors")
        rest = None
        if optimizer is not None:
            tensors, rest = _optimizer_tensors(optimizer)
            tensors["torch_rng_state"] = torch.get_rng_state()
            save_file(tensors, tmp / "optimizer.safetensors")
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state, "optimizer": rest}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving a step: move the old one aside first, then drop it
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / "latest")
    for old in list_checkpoints(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied tensors once, under their first name."""
    seen: set[int] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors[name] = t
    return tensors


def save_model_weights(model: nn.Module, path: Path) -> None:
    """Weights as safetensors; tied tensors are stored once."""
    save_file({n: t.detach().cpu().contiguous() for n, t in _unique_state(model).items()}, str(path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({e}); "
            f"use another checkpoint in {path.parent.parent} or retrain"
        ) from None


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights, checking names and shapes against the model."""
    path = Path(path)
    tensors = _load_safetensors(path)
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{n}: file {tuple(tensors[n].shape)} vs model {tuple(expected[n].shape)}"
        for n in tensors if n in expected and tensors[n].shape != expected[n].shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
            f"shape mismatch {', '.join(wrong[:5])}" if wrong else "",
        ]))
        raise CheckpointError(
            f"checkpoint {path} does not match the model config ({details}); "
            "load it with the config it was trained with (the run's config.json)"
        )
    model.load_state_dict(tensors, strict=False)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore weights (and optimizer and RNG when ``optimizer`` is given); return trainer state."""
    load_model_weights(model, path / "model.safetensors")
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'trainer.json'} is missing or corrupt ({e})") from None
    if optimizer is not None:
        if trainer.get("optimizer") is None:
            raise CheckpointError(f"{path} holds weights only (an imported model): it cannot be resumed")
        tensors = _load_safetensors(path / "optimizer.safetensors")
        torch.set_rng_state(tensors.pop("torch_rng_state"))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        try:
            optimizer.load_state_dict({"state": state, "param_groups": trainer["optimizer"]["param_groups"]})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"optimizer state in {path} does not fit this model: {e}") from None
    return trainer


def load_extra_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``extra_tensors`` saved with checkpoint ``path`` (a clear error when missing or corrupt)."""
    return _load_safetensors(path / "extra.safetensors")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    return read_json_file(Path(run_dir) / "config.json",
                          missing=f"{run_dir} is not a longctx run directory (no config.json)")


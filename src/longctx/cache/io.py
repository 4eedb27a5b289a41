"""A model state in a safetensors file: a long session survives a restart or forks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from longctx.cache.model_state import ModelState

FORMAT = "longctx-state-1"


def save_state(state: ModelState, path: str | Path, fingerprint: dict) -> None:
    """Write ``state`` atomically; ``fingerprint`` (e.g. the model config) is stored beside
    it so that loading into another model can be refused."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.state_dict().items()}
    meta = {"format": FORMAT, "batch_size": str(state.batch_size), "fingerprint": json.dumps(fingerprint, sort_keys=True)}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: str | Path, init_state: Callable[[int], ModelState], fingerprint: dict) -> ModelState:
    """The state in ``path``, in a fresh ``init_state(batch_size)`` of the model that will
    continue; raise if the file was saved from a different model or is not a state file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"state file {path} is corrupt or not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT or "fingerprint" not in meta or "batch_size" not in meta:
        raise ValueError(f"{path} is not a longctx state file (format {meta.get('format')!r})")
    if json.loads(meta["fingerprint"]) != json.loads(json.dumps(fingerprint, sort_keys=True)):
        raise ValueError(f"state file {path} was saved from a different model (its config or weights differ); "
                         "load it into the model that produced it")
    state = init_state(int(meta["batch_size"]))
    state.load_state_dict(tensors)
    return state

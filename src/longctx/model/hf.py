"""Hugging Face checkpoints in and out: ``from_hf(dir) -> LanguageModel``, ``to_hf(model, dir)``.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards with
``model.safetensors.index.json``).  Reading needs no ``transformers``; the files written
load with ``transformers``' ``from_pretrained``.  Supported: ``MambaForCausalLM``,
``Mamba2ForCausalLM`` (``hf_mamba``), ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (``hf_llama``, which says what each config key becomes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longctx.model import hf_llama, hf_mamba
from longctx.model.hf_common import HFCheckpointError
from longctx.model.lm import LanguageModel
from longctx.validation import read_json_file

__all__ = ["ARCHITECTURES", "HFCheckpointError", "from_hf", "model_from_tensors", "read_hf_config", "to_hf"]

# architecture -> (model_type, the module that reads and writes it)
ARCHITECTURES: dict[str, tuple[str, Any]] = {
    arch: (model_type, family)
    for family in (hf_mamba, hf_llama)
    for arch, model_type in family.ARCHITECTURES.items()
}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise HFCheckpointError(f"{file} is missing (pytorch_model.bin is not read: only safetensors)")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise HFCheckpointError(f"{file} is corrupt or truncated ({e})") from None
    return tensors


def read_hf_config(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``(architecture, config.json as a dict)`` of a checkpoint directory; the architecture
    comes from ``architectures`` or, failing that, ``model_type``."""
    path = Path(path)
    hf = read_json_file(path / "config.json", error=HFCheckpointError,
                        missing=f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        arch = next((a for a, (t, _) in ARCHITECTURES.items() if t == hf.get("model_type")), None)
    if arch is None:
        raise HFCheckpointError(
            f"{path}: architecture {archs or hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return arch, hf


def from_hf(path: str | Path) -> LanguageModel:
    """A ``LanguageModel`` with the weights of a local Hugging Face checkpoint directory."""
    path = Path(path)
    arch, hf = read_hf_config(path)
    return model_from_tensors(arch, hf, _read_tensors(path), path)


def model_from_tensors(arch: str, hf: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> LanguageModel:
    """The model of Hugging Face architecture ``arch`` with config values ``hf`` and
    ``tensors`` under their Hugging Face names (``path`` names the source in errors); fp32
    tensors become its parameters, uncopied."""
    family = ARCHITECTURES[arch][1]
    config = family.read_config(arch, hf, path)
    with torch.device("meta"):  # no random init of weights that the tensors replace
        model = LanguageModel(config)
    loaded, missing, used = {}, [], set()
    for name, target in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # shares the embedding
        parts = family.hf_parts(name, config)
        pieces = []
        for hf_name, rows in parts:
            if hf_name not in tensors:
                missing.append(hf_name)
                continue
            want = tuple(target.shape) if rows is None else (rows, *target.shape[1:])
            if tuple(tensors[hf_name].shape) != want:
                raise HFCheckpointError(
                    f"{path}: {hf_name} has shape {tuple(tensors[hf_name].shape)}, the config implies {want}"
                )
            pieces.append(tensors[hf_name])
            used.add(hf_name)
        if len(pieces) == len(parts):
            loaded[name] = torch.cat(pieces).to(torch.float32) if len(pieces) > 1 else pieces[0].to(torch.float32)
    if missing:
        raise HFCheckpointError(f"{path}: missing tensors {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    unused = sorted(n for n in tensors if n not in used and not family.ignored(n)
                    and not (n == "lm_head.weight" and config.tie_embeddings))
    if unused:
        listed = ", ".join(unused[:6]) + (" ..." if len(unused) > 6 else "")
        if family.UNEXPECTED == "error":
            raise HFCheckpointError(f"{path}: {len(unused)} unexpected tensor(s) that the {arch} config does not "
                                    f"describe: {listed}")
        warnings.warn(f"{path}: {len(unused)} tensor(s) not used by the {arch} mapping: {listed}", stacklevel=2)
    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def to_hf(model: LanguageModel, path: str | Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint (config.json + model.safetensors), atomically.

    Pure Mamba / Mamba-2 models without MLPs become ``MambaForCausalLM`` /
    ``Mamba2ForCausalLM``; pure attention models with RoPE and an MLP become
    ``LlamaForCausalLM`` (no biases, or biases on all four attention projections),
    ``Qwen2ForCausalLM`` (q/k/v biases) or ``MistralForCausalLM`` (a sliding window).  Other
    models (ALiBi, learned positions, dilated or hybrid layers) raise ``HFCheckpointError``.
    """
    c = model.config
    kinds = set(c.layers)
    if c.sink_token:
        raise HFCheckpointError("no Hugging Face architecture has a learned sink token (model.sink_token); "
                                "export a model trained without it")
    if c.memory_tokens:
        raise HFCheckpointError(f"this model reads its input in segments through {c.memory_tokens} memory tokens "
                                "(model.memory_tokens), which no Hugging Face architecture does; keep it as a "
                                "longctx run")
    if c.special_tokens:
        names = ", ".join(f"<{name}> (id {i})" for name, i in c.special_tokens.items())
        raise HFCheckpointError(f"this model was trained with {names} (model.special_tokens), and no Hugging Face "
                                "architecture represents them: transformers would neither append pauses, carry "
                                "memory tokens nor undo a backspace; keep it as a longctx run")
    if kinds <= {"mamba", "mamba2"}:
        family = hf_mamba
    elif kinds == {"attention"}:
        family = hf_llama
    else:
        raise HFCheckpointError(
            f"to_hf writes pure Mamba or Mamba-2 models (without MLPs) and pure attention models with RoPE "
            f"(Llama, Mistral, Qwen2); no Hugging Face architecture represents layers {sorted(kinds)}"
        )
    hf = family.write_config(c)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        t = t.detach().cpu()
        start = 0
        for hf_name, rows in family.hf_parts(name, c):
            rows = t.shape[0] if rows is None else rows
            tensors[hf_name] = t[start : start + rows].contiguous()
            start += rows
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise HFCheckpointError(f"{path} exists and is not a checkpoint directory; choose a new or empty one")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

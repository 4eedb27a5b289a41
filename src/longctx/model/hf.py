"""Hugging Face checkpoints in and out: ``from_hf(dir) -> LanguageModel``, ``to_hf(model, dir)``.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards with
``model.safetensors.index.json``).  Reading needs no ``transformers``; the files written
load with ``transformers``' ``from_pretrained``.  Supported: ``MambaForCausalLM``,
``Mamba2ForCausalLM``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longctx.model.config import ModelConfig
from longctx.model.lm import LanguageModel


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint is missing, unsupported, or does not fit its config."""


def _require(hf: dict[str, Any], key: str, path: Path) -> Any:
    if key not in hf:
        raise HFCheckpointError(f"{path / 'config.json'} has no {key!r}")
    return hf[key]


def _check_act(hf: dict[str, Any], path: Path) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")


def _mamba_config(hf: dict[str, Any], path: Path) -> ModelConfig:
    _check_act(hf, path)
    hidden = _require(hf, "hidden_size", path)
    expand = _require(hf, "expand", path)
    if hf.get("intermediate_size", expand * hidden) != expand * hidden:
        raise HFCheckpointError(f"{path}: intermediate_size must equal expand * hidden_size")
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size", path), d_model=hidden,
        layers=["mamba"] * _require(hf, "num_hidden_layers", path), mlp_hidden=0, pos="none",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
        ssm_state=_require(hf, "state_size", path), ssm_expand=expand, ssm_conv=hf.get("conv_kernel", 4),
        ssm_dt_rank=_require(hf, "time_step_rank", path), ssm_bias=hf.get("use_bias", False),
        ssm_conv_bias=hf.get("use_conv_bias", True), ssm_dt_min=hf.get("time_step_min", 0.001),
        ssm_dt_max=hf.get("time_step_max", 0.1), ssm_dt_floor=hf.get("time_step_floor", 1e-4),
    )


def _mamba2_config(hf: dict[str, Any], path: Path) -> ModelConfig:
    _check_act(hf, path)
    hidden = _require(hf, "hidden_size", path)
    expand, heads, head_dim = _require(hf, "expand", path), _require(hf, "num_heads", path), _require(hf, "head_dim", path)
    if heads * head_dim != expand * hidden:
        raise HFCheckpointError(
            f"{path}: num_heads * head_dim ({heads * head_dim}) must equal expand * hidden_size ({expand * hidden})"
        )
    # transformers writes infinity as {"__float__": "Infinity"}
    limit = [float(x["__float__"]) if isinstance(x, dict) else float(x)
             for x in hf.get("time_step_limit", [0.0, float("inf")])]
    if limit[0] != 0.0 or limit[1] != float("inf"):
        raise HFCheckpointError(f"{path}: time_step_limit {limit} is not supported (only [0.0, inf])")
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size", path), d_model=hidden,
        layers=["mamba2"] * _require(hf, "num_hidden_layers", path), mlp_hidden=0, pos="none",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False),
        ssm_state=_require(hf, "state_size", path), ssm_expand=expand, ssm_conv=hf.get("conv_kernel", 4),
        ssm_head_dim=head_dim, ssm_groups=hf.get("n_groups", 1), ssm_chunk=hf.get("chunk_size", 256),
        ssm_bias=hf.get("use_bias", False), ssm_conv_bias=hf.get("use_conv_bias", True),
        ssm_dt_min=hf.get("time_step_min", 0.001), ssm_dt_max=hf.get("time_step_max", 0.1),
        ssm_dt_floor=hf.get("time_step_floor", 1e-4),
    )


# architecture -> (config reader, model_type)
ARCHITECTURES: dict[str, tuple[Callable[[dict, Path], ModelConfig], str]] = {
    "MambaForCausalLM": (_mamba_config, "mamba"),
    "Mamba2ForCausalLM": (_mamba2_config, "mamba2"),
}


def _to_hf_name(name: str) -> str:
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        rest = rest.replace("mixer_norm.", "norm.", 1)
        return f"backbone.layers.{index}.{rest}"
    return {"embed.weight": "backbone.embeddings.weight", "norm.weight": "backbone.norm_f.weight"}.get(name, name)


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
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    hf = json.loads(config_file.read_text())
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        arch = next((a for a, (_, t) in ARCHITECTURES.items() if t == hf.get("model_type")), None)
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
    config = ARCHITECTURES[arch][0](hf, path)
    model = LanguageModel(config)
    tensors = _read_tensors(path)
    ours = {n: t for n, t in model.state_dict().items()}
    loaded = {}
    missing = []
    for name, target in ours.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # shares the embedding
        hf_name = _to_hf_name(name)
        if hf_name not in tensors:
            missing.append(hf_name)
            continue
        if tensors[hf_name].shape != target.shape:
            raise HFCheckpointError(
                f"{path}: {hf_name} has shape {tuple(tensors[hf_name].shape)}, the config implies {tuple(target.shape)}"
            )
        loaded[name] = tensors[hf_name].to(torch.float32)
    if missing:
        raise HFCheckpointError(f"{path}: missing tensors {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    used = {_to_hf_name(name) for name in loaded}
    unused = sorted(n for n in tensors if n not in used and not (n == "lm_head.weight" and config.tie_embeddings))
    if unused:
        warnings.warn(f"{path}: {len(unused)} tensor(s) not used by the {arch} mapping: {', '.join(unused[:6])}",
                      stacklevel=2)
    model.load_state_dict(loaded, strict=False)
    return model.eval()


def to_hf(model: LanguageModel, path: str | Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint (config.json + model.safetensors), atomically."""
    c = model.config
    kinds = set(c.layers)
    if kinds == {"mamba"} and not c.mlp_hidden:
        hf = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "intermediate_size": c.ssm_expand * c.d_model,
              "time_step_rank": c.ssm_dt_rank, "tie_word_embeddings": c.tie_embeddings}
    elif kinds == {"mamba2"} and not c.mlp_hidden:
        hf = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
              "num_heads": c.ssm_expand * c.d_model // c.ssm_head_dim, "head_dim": c.ssm_head_dim,
              "n_groups": c.ssm_groups, "chunk_size": c.ssm_chunk, "time_step_limit": [0.0, float("inf")],
              "tie_word_embeddings": c.tie_embeddings}
    else:
        raise HFCheckpointError(
            f"to_hf writes pure Mamba or Mamba-2 models without MLPs; this one has layers {sorted(kinds)} "
            f"and mlp_hidden {c.mlp_hidden}"
        )
    hf.update(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=len(c.layers),
              state_size=c.ssm_state, expand=c.ssm_expand, conv_kernel=c.ssm_conv, use_bias=c.ssm_bias,
              use_conv_bias=c.ssm_conv_bias, layer_norm_epsilon=c.norm_eps, hidden_act="silu",
              time_step_min=c.ssm_dt_min, time_step_max=c.ssm_dt_max, time_step_floor=c.ssm_dt_floor,
              residual_in_fp32=True, torch_dtype="float32")
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        tensors[_to_hf_name(name)] = t.detach().cpu().contiguous()
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

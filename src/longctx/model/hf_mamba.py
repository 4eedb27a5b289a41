"""``MambaForCausalLM`` and ``Mamba2ForCausalLM`` <-> pure Mamba / Mamba-2 models without MLPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longctx.model.config import ModelConfig
from longctx.model.hf_common import HFCheckpointError, Parts, check_act, model_config, require

ARCHITECTURES = {"MambaForCausalLM": "mamba", "Mamba2ForCausalLM": "mamba2"}
# Tensors a checkpoint may hold beyond the config's: reported, not refused (as before).
UNEXPECTED = "warn"


def read_config(arch: str, hf: dict[str, Any], path: Path) -> ModelConfig:
    return (_mamba_config if arch == "MambaForCausalLM" else _mamba2_config)(hf, path)


def _mamba_config(hf: dict[str, Any], path: Path) -> ModelConfig:
    check_act(hf, path)
    hidden = require(hf, "hidden_size", path)
    expand = require(hf, "expand", path)
    if hf.get("intermediate_size", expand * hidden) != expand * hidden:
        raise HFCheckpointError(f"{path}: intermediate_size must equal expand * hidden_size")
    return model_config(
        path, vocab_size=require(hf, "vocab_size", path), d_model=hidden,
        layers=["mamba"] * require(hf, "num_hidden_layers", path), mlp_hidden=0, pos="none",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
        ssm_state=require(hf, "state_size", path), ssm_expand=expand, ssm_conv=hf.get("conv_kernel", 4),
        ssm_dt_rank=require(hf, "time_step_rank", path), ssm_bias=hf.get("use_bias", False),
        ssm_conv_bias=hf.get("use_conv_bias", True), ssm_dt_min=hf.get("time_step_min", 0.001),
        ssm_dt_max=hf.get("time_step_max", 0.1), ssm_dt_floor=hf.get("time_step_floor", 1e-4),
    )


def _mamba2_config(hf: dict[str, Any], path: Path) -> ModelConfig:
    check_act(hf, path)
    hidden = require(hf, "hidden_size", path)
    expand, heads, head_dim = require(hf, "expand", path), require(hf, "num_heads", path), require(hf, "head_dim", path)
    if heads * head_dim != expand * hidden:
        raise HFCheckpointError(
            f"{path}: num_heads * head_dim ({heads * head_dim}) must equal expand * hidden_size ({expand * hidden})"
        )
    # transformers writes infinity as {"__float__": "Infinity"}
    limit = [float(x["__float__"]) if isinstance(x, dict) else float(x)
             for x in hf.get("time_step_limit", [0.0, float("inf")])]
    if limit[0] != 0.0 or limit[1] != float("inf"):
        raise HFCheckpointError(f"{path}: time_step_limit {limit} is not supported (only [0.0, inf])")
    return model_config(
        path, vocab_size=require(hf, "vocab_size", path), d_model=hidden,
        layers=["mamba2"] * require(hf, "num_hidden_layers", path), mlp_hidden=0, pos="none",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False),
        ssm_state=require(hf, "state_size", path), ssm_expand=expand, ssm_conv=hf.get("conv_kernel", 4),
        ssm_head_dim=head_dim, ssm_groups=hf.get("n_groups", 1), ssm_chunk=hf.get("chunk_size", 256),
        ssm_bias=hf.get("use_bias", False), ssm_conv_bias=hf.get("use_conv_bias", True),
        ssm_dt_min=hf.get("time_step_min", 0.001), ssm_dt_max=hf.get("time_step_max", 0.1),
        ssm_dt_floor=hf.get("time_step_floor", 1e-4),
    )


def hf_parts(name: str, config: ModelConfig) -> Parts:
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        rest = rest.replace("mixer_norm.", "norm.", 1)
        return [(f"backbone.layers.{index}.{rest}", None)]
    return [({"embed.weight": "backbone.embeddings.weight", "norm.weight": "backbone.norm_f.weight"}.get(name, name),
             None)]


def ignored(hf_name: str) -> bool:
    return False


def write_config(c: ModelConfig) -> dict[str, Any]:
    kinds = set(c.layers)
    if not c.ssm_selective and "mamba" in kinds:
        raise HFCheckpointError("to_hf cannot write a time-invariant Mamba (model.ssm_selective = false): "
                                "Hugging Face's MambaForCausalLM is selective only")
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
    return hf

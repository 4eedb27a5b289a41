"""What the Hugging Face format modules share: the error, config reading helpers, tensor layouts.

A family module (``hf_mamba``, ``hf_llama``) describes each tensor of our state dict as
the Hugging Face tensors it is made of: ``[(hf_name, rows)]``, the parts stacked along
dim 0 in order (``rows`` None for a tensor taken whole), so fused projections (our
``qkv``, ``gate_up``) and separate ones (``q_proj``, ``k_proj``, ``v_proj``) map both ways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longctx.model.config import ConfigError, ModelConfig

# One tensor of ours as Hugging Face parts: [(hf_name, rows or None)].
Parts = list[tuple[str, "int | None"]]


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint is missing, unsupported, or does not fit its config."""


def require(hf: dict[str, Any], key: str, path: Path) -> Any:
    if hf.get(key) is None:
        raise HFCheckpointError(f"{path / 'config.json'} has no {key!r}")
    return hf[key]


def check_act(hf: dict[str, Any], path: Path) -> None:
    # transformers' ACT2FN maps "swish" to the same SiLU.
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise HFCheckpointError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")


def model_config(path: Path, **values: Any) -> ModelConfig:
    """``ModelConfig(**values)``, its errors reported against the checkpoint."""
    try:
        return ModelConfig(**values)
    except ConfigError as e:
        raise HFCheckpointError(f"{path}: the config does not give a valid model: {e}") from None

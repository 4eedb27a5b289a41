"""``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` <-> attention models with RoPE.

The three share one layout: pre-norm blocks of RMSNorm, attention (GQA, RoPE in the
rotate-half pairing) and a SwiGLU MLP ``down(silu(gate(x)) * up(x))``, a final RMSNorm
and an LM head.  They differ in what the config turns on:

- Llama: ``attention_bias`` (biases on q, k, v and o: our ``attn_bias`` and
  ``attn_out_bias``); ``mlp_bias`` is refused (our SwiGLU has no biases).
- Mistral: ``sliding_window`` (our ``attn_window``; null: none).
- Qwen2: biases on q, k, v only (``attn_bias``); a sliding window when
  ``use_sliding_window`` and every layer is a sliding one (mixed layers are refused).

RoPE scaling (``rope_parameters``, or ``rope_scaling`` + ``rope_theta`` as transformers 4
wrote them): linear, dynamic, llama3 and yarn, as ``longctx.ops.rope`` computes them.
``max_position_embeddings`` becomes ``context_len`` (informational: transformers enforces
no limit on RoPE models, so neither does the import), and the original length of dynamic
scaling.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from longctx.model.config import ModelConfig
from longctx.model.hf_common import HFCheckpointError, Parts, check_act, model_config, require
from longctx.ops.rope import ROPE_SCALINGS, check_rope_scaling

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# Tensors beyond the config's mean the config misdescribes the model: refused.
UNEXPECTED = "error"

# transformers' defaults for keys a config.json may leave out, by model_type.
_KV_HEADS = {"llama": None, "mistral": 8, "qwen2": 32}  # None: num_attention_heads
_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
_DEFAULT_CONTEXT = 2048  # max_position_embeddings written for a model with no context_len


def read_config(arch: str, hf: dict[str, Any], path: Path) -> ModelConfig:
    kind = ARCHITECTURES[arch]
    check_act(hf, path)
    if hf.get("mlp_bias"):
        raise HFCheckpointError(f"{path}: mlp_bias = true is not supported (longctx's SwiGLU MLP has no biases)")
    heads, hidden = require(hf, "num_attention_heads", path), require(hf, "hidden_size", path)
    kv_heads = hf["num_key_value_heads"] if "num_key_value_heads" in hf else _KV_HEADS[kind]
    max_positions = hf.get("max_position_embeddings") or _MAX_POSITIONS[kind]
    theta, scaling = _read_rope(hf, path, max_positions)
    bias = {"llama": bool(hf.get("attention_bias", False)), "mistral": False, "qwen2": True}[kind]
    return model_config(
        path, vocab_size=require(hf, "vocab_size", path), d_model=hidden,
        layers=["attention"] * require(hf, "num_hidden_layers", path), n_heads=heads,
        n_kv_heads=kv_heads if kv_heads is not None else heads, head_dim=hf.get("head_dim") or hidden // heads,
        pos="rope", rope_theta=float(theta), rope_scaling=scaling, context_len=max_positions,
        mlp_hidden=require(hf, "intermediate_size", path), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attn_bias=bias,
        attn_out_bias=bias and kind == "llama", attn_window=_read_window(kind, hf, path),
    )


def _read_rope(hf: dict[str, Any], path: Path, max_positions: int) -> tuple[float, dict[str, Any] | None]:
    """(theta, our rope_scaling) as transformers 5 resolves them: a legacy ``rope_scaling``
    wins over ``rope_parameters``; ``rope_theta`` inside them over the top-level one."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    nested = [key for key in params if key in (hf.get("layer_types") or ())]
    if nested:
        raise HFCheckpointError(f"{path}: per-layer RoPE parameters ({', '.join(nested)}) are not supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        raise HFCheckpointError(f"{path}: partial_rotary_factor {partial} is not supported (RoPE on the whole head)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALINGS:
        raise HFCheckpointError(f"{path}: rope_type {kind!r} is not supported; supported: default, "
                                f"{', '.join(ROPE_SCALINGS)}")
    required, optional = ROPE_SCALINGS[kind]
    scaling = {key: params[key] for key in required + optional if params.get(key) is not None}
    scaling["rope_type"] = kind
    ignored = sorted(set(params) - set(scaling) - {"type", "rope_theta", "partial_rotary_factor"})
    if kind in ("llama3", "yarn"):
        # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style configs)
        if hf.get("original_max_position_embeddings") is not None:
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_positions)
        if kind == "yarn" and "factor" not in scaling:
            scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = max_positions  # transformers scales from this length
        ignored = [key for key in ignored if key != "original_max_position_embeddings"]
    if ignored:
        warnings.warn(f"{path}: rope parameter(s) {', '.join(ignored)} are not used by rope_type {kind!r}",
                      stacklevel=4)
    try:
        return theta, check_rope_scaling(scaling)
    except ValueError as e:
        raise HFCheckpointError(f"{path}: rope parameters: {e}") from None


def _read_window(kind: str, hf: dict[str, Any], path: Path) -> int | None:
    if kind == "mistral":
        return hf["sliding_window"] if "sliding_window" in hf else 4096
    if kind == "llama" or not hf.get("use_sliding_window", False) or hf.get("sliding_window", 4096) is None:
        return None
    n = require(hf, "num_hidden_layers", path)
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                                      for i in range(n)]
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return hf.get("sliding_window", 4096)
    raise HFCheckpointError(f"{path}: layers mix full and sliding-window attention ({types}); longctx models have "
                            "one attention window for every layer")


def hf_parts(name: str, c: ModelConfig) -> Parts:
    if not name.startswith("blocks."):
        return [({"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}.get(name, name),
                 None)]
    _, index, rest = name.split(".", 2)
    prefix = f"model.layers.{index}."
    kind = rest.rsplit(".", 1)[-1]  # weight or bias
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    table: dict[str, Parts] = {
        "mixer_norm.weight": [("input_layernorm.weight", None)],
        "mlp_norm.weight": [("post_attention_layernorm.weight", None)],
        f"mixer.qkv.{kind}": [(f"self_attn.q_proj.{kind}", q_rows), (f"self_attn.k_proj.{kind}", kv_rows),
                              (f"self_attn.v_proj.{kind}", kv_rows)],
        f"mixer.out.{kind}": [(f"self_attn.o_proj.{kind}", None)],
        "mlp.gate_up.weight": [("mlp.gate_proj.weight", c.mlp_hidden), ("mlp.up_proj.weight", c.mlp_hidden)],
        "mlp.down.weight": [("mlp.down_proj.weight", None)],
    }
    if rest not in table:
        raise HFCheckpointError(f"no Hugging Face name for {name}")
    return [(prefix + hf_name, rows) for hf_name, rows in table[rest]]


def ignored(hf_name: str) -> bool:
    # Checkpoints from transformers < 4.31 saved RoPE's inverse frequencies, which are recomputed.
    return hf_name.endswith(".rotary_emb.inv_freq")


def write_config(c: ModelConfig) -> dict[str, Any]:
    """The config.json of the architecture that represents ``c``: Qwen2 for q/k/v biases,
    Llama for biases on all four projections or none, Mistral for a sliding window."""
    refuse = None
    if c.pos != "rope":
        refuse = f"pos = {c.pos!r} (Llama, Mistral and Qwen2 use RoPE)"
    elif not c.mlp_hidden:
        refuse = "no MLP (mlp_hidden = 0)"
    elif c.attn_out_bias and not c.attn_bias:
        refuse = "a bias on the attention output but not on q/k/v"
    elif c.attn_out_bias and c.attn_window is not None:
        refuse = "attention biases on all four projections (Llama) with a sliding window (Mistral, Qwen2)"
    if refuse:
        raise HFCheckpointError(f"no Hugging Face architecture represents this model: {refuse}")
    arch = "Qwen2ForCausalLM" if c.attn_bias and not c.attn_out_bias else \
        "MistralForCausalLM" if c.attn_window is not None else "LlamaForCausalLM"
    kind = ARCHITECTURES[arch]
    scaling = dict(c.rope_scaling or {})
    rope = {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": c.rope_theta}
    max_positions = c.context_len or c.max_seq_len
    if rope["rope_type"] == "dynamic":
        original = scaling.pop("original_max_position_embeddings")
        if c.context_len is not None and c.context_len != original:
            raise HFCheckpointError(
                f"dynamic RoPE scaling from {original} positions, but context_len is {c.context_len}: transformers "
                "reads both from max_position_embeddings; make them equal"
            )
        max_positions = original
    elif max_positions is None and "original_max_position_embeddings" in scaling:
        max_positions = int(scaling["original_max_position_embeddings"] * scaling["factor"])
    rope.update(scaling)
    hf: dict[str, Any] = {
        "architectures": [arch], "model_type": kind, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "intermediate_size": c.mlp_hidden, "num_hidden_layers": len(c.layers), "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_positions or _DEFAULT_CONTEXT, "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings, "rope_parameters": rope,
        # transformers 4 reads these two instead of rope_parameters
        "rope_theta": c.rope_theta,
        "rope_scaling": None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]},
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32",
    }
    if kind == "llama":
        hf.update(attention_bias=c.attn_bias, mlp_bias=False)
    elif kind == "mistral":
        hf.update(sliding_window=c.attn_window)
    else:
        window = c.attn_window is not None
        hf.update(use_sliding_window=window, sliding_window=c.attn_window, max_window_layers=0 if window else len(c.layers),
                  layer_types=["sliding_attention" if window else "full_attention"] * len(c.layers))
    return hf

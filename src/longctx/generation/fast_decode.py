"""One-token decoding steps on the CPU in two kernel calls per layer.

A decoding step through the modules costs about 50 small torch operations per layer; on a
small model their dispatch costs more than reading the weights (SmolLM2-135M with int4
weights: ~20 ms a token, of which the matmuls are 7).  ``fast_decoder(model, state)``
returns a step that does the same work with the numba kernels of
``longctx.ops.decode_kernels`` (norm, QKV and RoPE in one call; attention over the KV
cache, output projection, norm and SwiGLU in another), reading the weights and the cache
in place, or None when the model or state is outside what those kernels cover:

- CPU, fp32, batch 1, no gradients wanted;
- every block an attention mixer (RoPE or no positions; not ALiBi, not an attention window,
  not learned position embeddings) with an RMSNorm'd SwiGLU MLP;
- every layer state a dense ``KVCache``, and no memory tokens;
- linear layers fp32 or ``QuantizedLinear`` (int8, int4).

The step's logits equal ``model(token, state, last_only=True)[:, -1]`` up to the rounding
of a different summation order (the tests compare the two).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from longctx.cache.kv import KVCache
from longctx.layers.attention import Attention
from longctx.layers.mlp import SwiGLU
from longctx.layers.norm import RMSNorm
from longctx.layers.quantized import QuantizedLinear
from longctx.ops.rope import rope_cos_sin

_EMPTY = np.empty(0, dtype=np.float32)


def _weight(linear: nn.Module) -> tuple[np.ndarray, ...] | None:
    """The kernels' weight tuple of a linear layer (``decode_kernels``' docstring); None if
    it has another type or layout."""
    if isinstance(linear, QuantizedLinear):
        tensors = (linear.codes, linear.scale) if linear.kind == "int8" else (linear.codes, linear.scale, linear.low)
    elif type(linear) is nn.Linear:
        tensors = (linear.weight.detach(),)
    else:
        return None
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    if tensors[-1].dtype != torch.float32:
        return None
    return tuple(t.numpy() for t in tensors)


def _bias(linear: nn.Module) -> np.ndarray | None:
    bias = linear.bias
    if bias is None:
        return _EMPTY
    return bias.detach().numpy() if bias.dtype == torch.float32 and bias.is_contiguous() else None


def _layer_plan(block: nn.Module, cache) -> dict | None:
    """The arrays and sizes one layer's kernels take, or None if the block is not covered."""
    attn, mlp = block.mixer, block.mlp
    if type(attn) is not Attention or type(mlp) is not SwiGLU or not isinstance(cache, KVCache):
        return None
    if attn.pos not in ("rope", "none") or attn.window is not None:
        return None
    if not (isinstance(block.mixer_norm, RMSNorm) and isinstance(block.mlp_norm, RMSNorm)):
        return None
    weights = [_weight(m) for m in (attn.qkv, attn.out, mlp.gate_up, mlp.down)]
    biases = [_bias(attn.qkv), _bias(attn.out)]
    norms = [n.weight.detach() for n in (block.mixer_norm, block.mlp_norm)]
    if any(w is None for w in (*weights, *biases)) or any(n.dtype != torch.float32 for n in norms):
        return None
    return {"attn": attn, "cache": cache, "qkv_w": weights[0], "out_w": weights[1], "gate_up_w": weights[2],
            "down_w": weights[3], "qkv_b": biases[0], "out_b": biases[1],
            "norms": [n.numpy() for n in norms], "eps": [np.float32(n.eps) for n in (block.mixer_norm,
                                                                                     block.mlp_norm)],
            "hidden": mlp.hidden}


def fast_decoder(model: nn.Module, state) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``step(token (1, 1)) -> logits (1, vocab)`` for ``model`` continuing ``state``, or None
    (module docstring).  Build it once per generation: it holds views of the weights as they
    are now."""
    from longctx.model.lm import LanguageModel

    if type(model) is not LanguageModel or state is None or state.batch_size != 1 or torch.is_grad_enabled():
        return None
    if model.memory is not None:  # segments write and read memory: the model's own forward does it
        return None
    if model.pos_embed is not None or model.embed.weight.device.type != "cpu" or model.embed.weight.dtype != torch.float32:
        return None
    if not isinstance(model.norm, RMSNorm):
        return None
    layers = [_layer_plan(block, cache) for block, cache in zip(model.blocks, state.layers)]
    if any(p is None for p in layers):
        return None
    import numba

    from longctx.ops import decode_kernels as kernels

    attn = layers[0]["attn"]
    heads, kv_heads, dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = torch.empty((heads + 2 * kv_heads) * dim)
    qkv_np = qkv.numpy()
    # this step's keys and values inside qkv, shaped as KVCache.update takes them
    k_new = qkv[heads * dim : (heads + kv_heads) * dim].view(1, 1, kv_heads, dim)
    v_new = qkv[(heads + kv_heads) * dim :].view(1, 1, kv_heads, dim)
    no_rotation = np.zeros((2, dim), dtype=np.float32)
    rotated = heads + kv_heads if attn.pos == "rope" else 0  # q and k heads
    scale = np.float32(dim**-0.5)
    chunks = 2 * numba.get_num_threads()  # parallel pieces of each kv head's keys in the attention
    embed = model.embed.weight.detach()

    def step(token: torch.Tensor) -> torch.Tensor:
        x = embed[int(token.reshape(-1)[0])].numpy().copy()
        position = layers[0]["cache"].seq_len  # every layer has seen the same tokens
        cos_sin = no_rotation
        if attn.pos == "rope":
            cos_sin = rope_cos_sin(torch.tensor([position]), dim, attn.rope_theta, scaling=attn.rope_scaling,
                                   seq_len=position + 1)[0].numpy()
        for p in layers:
            kernels.attention_in(x, p["norms"][0], p["eps"][0], p["qkv_w"], p["qkv_b"], cos_sin, rotated, qkv_np)
            p["cache"].update(k_new, v_new)
            k_store, v_store, lo, hi = p["cache"].head_major()
            x = kernels.attention_out_mlp(x, qkv_np, k_store[0].numpy(), v_store[0].numpy(), lo, hi, heads, scale,
                                          p["out_w"], p["out_b"], p["norms"][1], p["eps"][1], p["gate_up_w"],
                                          p["down_w"], p["hidden"], chunks)
        state.seq_len += 1
        return model.lm_head(model.norm(torch.from_numpy(x)[None, None]))[:, -1]

    return step

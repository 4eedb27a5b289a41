"""Quantized weights as a property of linear layers: ``QuantizedLinear`` holds a packed
weight and calls the op of ``longctx.ops.quantized``; ``quantize_model`` swaps a built
model's linear layers for them.  No mixer knows whether its projections are quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from longctx.ops.quantized import (
    dequantize_int4,
    dequantize_int8,
    int4_linear,
    int8_linear,
    quantize_int4,
    quantize_int8,
)

WEIGHT_KINDS = ("fp32", "int8", "int4")


class QuantizedLinear(nn.Module):
    """``x (..., in_features) -> (..., out_features)`` with an int8 (per output channel) or
    int4 (groups of ``group`` inputs) weight kept packed; inference only (the weight is a
    buffer, not a parameter)."""

    def __init__(self, linear: nn.Linear, kind: str, group: int = 32) -> None:
        super().__init__()
        if kind not in ("int8", "int4"):
            raise ValueError(f"quantized weights are int8 or int4; got {kind!r}")
        self.kind, self.in_features, self.out_features = kind, linear.in_features, linear.out_features
        w = linear.weight.detach()
        if kind == "int8":
            q, scale = quantize_int8(w)
            self.register_buffer("codes", q)
            self.register_buffer("scale", scale)
            self.low = None
        else:
            packed, scale, low = quantize_int4(w, group)
            self.register_buffer("codes", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("low", low)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            return int8_linear(x, self.codes, self.scale, self.bias)
        return int4_linear(x, self.codes, self.scale, self.low, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The weight the layer multiplies by, as fp32 ``(out_features, in_features)``."""
        if self.kind == "int8":
            return dequantize_int8(self.codes, self.scale)
        return dequantize_int4(self.codes, self.scale, self.low)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def quantize_model(model: nn.Module, kind: str, group: int = 32) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` (the blocks' projections and the LM head)
    by ``QuantizedLinear`` of ``kind`` (``fp32`` leaves the model as it is); returns ``model``.
    Embeddings stay fp32 (a token reads one row of them), and so do linear layers whose
    weight a mixer reads itself (marked ``weight_read_directly``, e.g. Mamba's x_proj and
    dt_proj, which its fused decode step takes).  int4 needs the quantized layers' input
    sizes to be multiples of ``group``.

    With int4 the LM head (``model.lm_head``) is int8, as llama.cpp's 4-bit files keep their
    output matrix at 6-8 bits: the logits are what sampling reads, and 4 bits there cost
    SmolLM2-135M 5% of perplexity on held-out code, 8 bits 0.01%
    (``tests/model/test_quantized_quality.py``)."""
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_KINDS)}; got {kind!r}")
    if kind == "fp32":
        return model
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and not getattr(child, "weight_read_directly", False)]

    def kind_of(parent: nn.Module, name: str) -> str:
        return "int8" if kind == "int4" and parent is model and name == "lm_head" else kind

    int4 = [child for parent, name, child in targets if kind_of(parent, name) == "int4"]
    bad = sorted({child.in_features for child in int4 if child.in_features % group})
    if bad:
        raise ValueError(f"int4 weights in groups of {group} need input sizes that are multiples of {group}; "
                         f"this model has {', '.join(map(str, bad))}: use --weights int8")
    for parent, name, child in targets:
        setattr(parent, name, QuantizedLinear(child, kind_of(parent, name), group))
    return model

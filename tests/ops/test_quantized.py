"""Weight-only quantized linear maps: the packed kernels equal their dequantize-and-matmul
reference, quantization is as exact as its format allows, and a quantized model decodes
as its own full pass."""

import pytest
import torch

from longctx.layers.quantized import QuantizedLinear, quantize_model
from longctx.model import LanguageModel, ModelConfig
from longctx.ops.quantized import (
    dequantize_int4,
    dequantize_int8,
    int4_linear,
    int4_linear_ref,
    int8_linear,
    int8_linear_ref,
    quantize_int4,
    quantize_int8,
)

G = torch.Generator().manual_seed(0)


def _reference_int4(w, group):
    """Per group of ``group`` inputs: 16 levels from its min to its max, written out."""
    n, k = w.shape
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(n):
        for start in range(0, k, group):
            g = w[i, start : start + group].double()
            lo, step = g.min(), (g.max() - g.min()) / 15
            out[i, start : start + group] = lo + torch.round((g - lo) / step) * step
    return out


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("shape", [(48, 64), (7, 96), (130, 256)])
def test_kernels_equal_their_reference(rows, shape):
    n, k = shape
    w = torch.randn(n, k, generator=G)
    x = torch.randn(2, rows, k, generator=G)
    bias = torch.randn(n, generator=G)
    q, scale = quantize_int8(w)
    torch.testing.assert_close(int8_linear(x, q, scale, bias), int8_linear_ref(x, q, scale, bias), atol=1e-4, rtol=1e-5)
    for group in (32,) if k % 64 else (32, 64):
        packed, s, low = quantize_int4(w, group)
        torch.testing.assert_close(int4_linear(x, packed, s, low, bias), int4_linear_ref(x, packed, s, low, bias),
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", [(48, 64), (7, 96), (130, 256)])
def test_dequantize_kernels_equal_their_reference(shape):
    """The CPU dequantization of prefill-sized inputs, against the torch reference."""
    from longctx.ops import quantized_kernels as kernels

    w = torch.randn(*shape, generator=G)
    q, scale = quantize_int8(w)
    out = torch.empty(shape)
    kernels.int8_dequantize(q.numpy(), scale.numpy(), out.numpy())
    assert torch.equal(out, dequantize_int8(q, scale))
    for group in (32,) if shape[1] % 64 else (32, 64):
        packed, s, low = quantize_int4(w, group)
        kernels.int4_dequantize(packed.numpy(), s.numpy(), low.numpy(), out.numpy())
        torch.testing.assert_close(out, dequantize_int4(packed, s, low), atol=1e-6, rtol=1e-6)  # fma or not


def test_quantization_is_as_exact_as_its_format():
    w = torch.randn(64, 128, generator=G)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert (dequantize_int8(q, scale) - w).abs().max() <= scale.max() / 2 * 1.0001  # half a step per channel
    for group in (32, 64, 128):
        packed, s, low = quantize_int4(w, group)
        assert packed.dtype == torch.uint8 and packed.shape == (1, 64, 64)  # one block of 64 channels
        torch.testing.assert_close(dequantize_int4(packed, s, low).double(), _reference_int4(w, group),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="group size must be one of 32, 64, 128"):
        quantize_int4(w, 48)
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int4(torch.randn(4, 80), 64)


def test_gradients_flow_to_the_input_on_the_reference_path():
    layer = QuantizedLinear(torch.nn.Linear(32, 16), "int4")
    x = torch.randn(1, 32, generator=G, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized().sum(0, keepdim=True))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_model_decodes_as_its_full_pass(kind):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=96, d_model=64, layers=["attention", "mamba"], n_heads=4, n_kv_heads=2,
                         mlp_hidden=128, ssm_state=8)
    fp32 = LanguageModel(config).eval()
    model = LanguageModel(config).eval()
    model.load_state_dict(fp32.state_dict())
    quantize_model(model, kind)
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert kept == ["blocks.1.mixer.x_proj", "blocks.1.mixer.dt_proj"]  # read by Mamba's fused decode step
    assert model.blocks[0].mixer.qkv.kind == kind and model.lm_head.kind == "int8"  # int4 keeps an int8 LM head
    assert model.num_parameters() == fp32.num_parameters()
    ids = torch.randint(0, 96, (1, 20), generator=G)
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(1)
        steps = torch.cat([model(ids[:, :12], state)] + [model(ids[:, t : t + 1], state) for t in range(12, 20)], 1)
        torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
        # Close to the fp32 model, and not equal to it: the weights really are quantized.
        gap = (full - fp32(ids)).abs().max().item()
    assert 0 < gap < (0.05 if kind == "int8" else 0.5)


def test_unsuitable_sizes_are_refused():
    model = LanguageModel(ModelConfig(vocab_size=40, d_model=48, layers=["attention"], n_heads=4))
    with pytest.raises(ValueError, match="multiples of 32; this model has 48.*use --weights int8"):
        quantize_model(model, "int4")
    with pytest.raises(ValueError, match="--weights must be one of fp32, int8, int4"):
        quantize_model(model, "int2")

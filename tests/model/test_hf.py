"""Hugging Face interchange: logits equal transformers' own forward, and the round trip."""

import json

import pytest
import torch

from longctx.model import LanguageModel, ModelConfig
from longctx.model.hf import HFCheckpointError, from_hf, to_hf

transformers = pytest.importorskip("transformers")


def _hf_mamba(tmp_path, tie=True):
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=8,
                                   tie_word_embeddings=tie)
    model = transformers.MambaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def _hf_mamba2(tmp_path, groups=1):
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16,
                                    num_heads=4, n_groups=groups, expand=2, chunk_size=8)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def _perturb(model):
    """Random init leaves A_log, D, norms at structured values; perturb so parity means something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


IDS = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("build", [lambda p: _hf_mamba(p), lambda p: _hf_mamba(p, tie=False),
                                   lambda p: _hf_mamba2(p), lambda p: _hf_mamba2(p, groups=2)])
def test_logits_equal_transformers(tmp_path, build):
    hf = build(tmp_path)
    _perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    with torch.no_grad():
        expected = hf(IDS).logits
        got = ours(IDS)
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("layers", [["mamba"] * 2, ["mamba2"] * 2])
def test_round_trip_through_transformers(tmp_path, layers):
    torch.manual_seed(0)
    ours = LanguageModel(ModelConfig(vocab_size=50, d_model=32, layers=layers, mlp_hidden=0, pos="none",
                                     ssm_state=8, ssm_head_dim=16, ssm_chunk=8)).eval()
    _perturb(ours)
    to_hf(ours, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    back = from_hf(tmp_path / "out")
    with torch.no_grad():
        want = ours(IDS)
        assert (hf(IDS).logits - want).abs().max() <= 1e-4
        torch.testing.assert_close(back(IDS), want, rtol=0, atol=0)


def test_unsupported_and_broken_checkpoints(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"architectures": ["GPTBigCodeForCausalLM"]}))
    with pytest.raises(HFCheckpointError, match="not supported; supported: MambaForCausalLM"):
        from_hf(tmp_path / "x")
    with pytest.raises(HFCheckpointError, match="no config.json"):
        from_hf(tmp_path)
    _hf_mamba(tmp_path)
    from safetensors.torch import load_file, save_file
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["backbone.layers.1.mixer.A_log"]
    save_file(tensors, str(file))
    with pytest.raises(HFCheckpointError, match="missing tensors backbone.layers.1.mixer.A_log"):
        from_hf(tmp_path / "hf")


def test_to_hf_refuses_what_hf_cannot_hold(tmp_path):
    model = LanguageModel(ModelConfig(vocab_size=50, d_model=32, layers=["mamba", "attention"], n_heads=2))
    with pytest.raises(HFCheckpointError, match="pure Mamba or Mamba-2"):
        to_hf(model, tmp_path / "out")
    invariant = LanguageModel(ModelConfig(vocab_size=50, d_model=32, layers=["mamba"], mlp_hidden=0,
                                          ssm_selective=False))
    with pytest.raises(HFCheckpointError, match="time-invariant"):
        to_hf(invariant, tmp_path / "out")


def test_import_hf_run_keeps_attention_settings(tmp_path):
    """`longctx import-hf` on a Mistral checkpoint with a window and yarn RoPE: the run's saved
    config (JSON) rebuilds the same model."""
    from longctx.cli.main import main
    from longctx.train.runs import load_run

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                     max_position_embeddings=64, rope_parameters={
                                         "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    hf = transformers.MistralForCausalLM(cfg).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    _, model, _, _ = load_run(tmp_path / "run")
    assert model.config.attn_window == 8 and model.config.rope_scaling["rope_type"] == "yarn"
    with torch.no_grad():
        assert (model(IDS) - hf(IDS).logits).abs().max() <= 1e-4

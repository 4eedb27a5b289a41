"""Llama / Mistral / Qwen2 interchange: logits equal transformers' own (eager attention, fp32),
KV-cache decoding equals the full forward, to_hf round trips, and bad input is refused."""

import dataclasses
import json
import shutil

import pytest
import torch

from longctx.model import ConfigError, LanguageModel, ModelConfig
from longctx.model.hf import HFCheckpointError, from_hf, to_hf

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 40
IDS = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)

# name: (architecture, config overrides, our ModelConfig fields expected)
CASES = {
    "llama-gqa": ("Llama", {}, dict(n_kv_heads=2, tie_embeddings=False, attn_bias=False)),
    "llama-tied-mha": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True), dict(tie_embeddings=True)),
    "llama-bias-head_dim": ("Llama", dict(attention_bias=True, head_dim=16),
                            dict(attn_bias=True, attn_out_bias=True, head_dim=16)),
    "mistral-window": ("Mistral", dict(sliding_window=8), dict(attn_window=8)),
    "mistral-no-window": ("Mistral", dict(sliding_window=None), dict(attn_window=None)),
    "qwen2-bias": ("Qwen2", dict(tie_word_embeddings=True), dict(attn_bias=True, attn_out_bias=False)),
    "qwen2-window": ("Qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
                     dict(attn_window=8)),
    # RoPE scaling; original lengths well below T so that scaling changes the logits
    "linear": ("Llama", dict(max_position_embeddings=16, rope_parameters={"rope_type": "linear", "factor": 2.0}),
               dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "dynamic": ("Llama", dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
                dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16})),
    "llama3": ("Llama", dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500.0}), dict(rope_theta=500.0)),
    "yarn-qwen2-legacy": ("Qwen2", dict(max_position_embeddings=64, rope_theta=1000.0,
                                        rope_scaling={"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 16}),
                          dict(rope_theta=1000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 16})),
}


def _perturb(model, seed=1):
    """Random init leaves norms at 1 and biases at 0; perturb so that parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _save_hf(path, arch, **overrides):
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**{**SMALL, **overrides})
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    _perturb(model)
    model.save_pretrained(path)
    return _load_hf(path)


def _load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _decode(model, ids, pieces=(11, 9)):
    """Logits of a prefill, a second chunk and then one token at a time, through one state."""
    state, out, t = model.init_state(ids.shape[0]), [], 0
    for n in (*pieces, *[1] * (ids.shape[1] - sum(pieces))):
        out.append(model(ids[:, t : t + n], state))
        t += n
    return torch.cat(out, dim=1), state


def _hf_decode(hf, ids, pieces=(11, 9)):
    cache, out, t = None, [], 0
    for n in (*pieces, *[1] * (ids.shape[1] - sum(pieces))):
        result = hf(ids[:, t : t + n], past_key_values=cache, use_cache=True)
        cache = result.past_key_values
        out.append(result.logits)
        t += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", CASES)
def test_logits_decoding_and_round_trip(tmp_path, case):
    arch, overrides, expected = CASES[case]
    hf = _save_hf(tmp_path / "hf", arch, **overrides)
    ours = from_hf(tmp_path / "hf")
    for field, value in expected.items():
        assert getattr(ours.config, field) == value, field
    with torch.no_grad():
        want = hf(IDS).logits
        got = ours(IDS)
        assert (got - want).abs().max() <= 1e-4
        # the feature under test changes the logits (so the parity above is not vacuous)
        plain = dataclasses.replace(ours.config, attn_window=None, rope_scaling=None)
        if plain != ours.config:
            other = LanguageModel(plain).eval()
            other.load_state_dict(ours.state_dict())
            assert (other(IDS) - got).abs().max() > 1e-3

        decoded, state = _decode(ours, IDS)
        if ours.config.rope_scaling and ours.config.rope_scaling["rope_type"] == "dynamic":
            # Frequencies follow the length at each call and cached keys keep theirs, as in
            # transformers: decoding equals transformers' own decoding (a fresh model: its
            # rotary module remembers the longest length it saw), and, within the original
            # length, the full forward.
            assert (decoded - _hf_decode(_load_hf(tmp_path / "hf"), IDS)).abs().max() <= 1e-4
            short, _ = _decode(ours, IDS[:, :16], pieces=(5, 4))
            torch.testing.assert_close(short, ours(IDS[:, :16]), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(decoded, got, atol=1e-5, rtol=1e-5)
        if ours.config.attn_window:  # the cache keeps only what the window can still see
            assert all(s.seq_len - s.start == ours.config.attn_window - 1 for s in state.layers)

    to_hf(ours, tmp_path / "out")
    back_hf = _load_hf(tmp_path / "out")
    assert type(back_hf).__name__ == f"{'Llama' if case == 'mistral-no-window' else arch}ForCausalLM"
    assert ("lm_head.weight" in _tensor_names(tmp_path / "out")) == (not ours.config.tie_embeddings)
    back = from_hf(tmp_path / "out")
    assert back.config == ours.config
    with torch.no_grad():
        assert (back_hf(IDS).logits - got).abs().max() <= 1e-4
        torch.testing.assert_close(back(IDS), got, rtol=0, atol=0)


def _tensor_names(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_window_cache_and_sink_caches(tmp_path):
    """With attn_window, a window cache of the same size keeps exactly what a query sees (RoPE
    distances are unchanged by counting positions inside the cache); bigger ones are refused."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=VOCAB, d_model=32, layers=["attention"] * 2, n_heads=4,
                                      n_kv_heads=2, attn_window=8)).eval()
    _perturb(model)
    with torch.no_grad():
        full = model(IDS)
        state = model.init_state(2, cache="window", window=8)
        steps = torch.cat([model(IDS[:, :8], state)] + [model(IDS[:, t : t + 1], state) for t in range(8, T)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention window of 8"):
        model.init_state(1, cache="sinks", sinks=4, window=8)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "hf"
    _save_hf(path, "Llama")
    return path


def _edited(llama_dir, tmp_path, config=None, tensors=None):
    path = tmp_path / "edited"
    shutil.copytree(llama_dir, path)
    if config:
        values = json.loads((path / "config.json").read_text())
        values.update(config)
        (path / "config.json").write_text(json.dumps(values))
    if tensors:
        from safetensors.torch import load_file, save_file

        values = load_file(str(path / "model.safetensors"))
        tensors(values)
        save_file(values, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("config,match", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     "not supported; supported: .*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(intermediate_size=40), r"mlp.gate_proj.weight has shape \(48, 32\), the config implies \(40, 32\)"),
    (dict(num_key_value_heads=4), r"k_proj.weight has shape \(16, 32\), the config implies \(32, 32\)"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
     "rope_type 'longrope' is not supported; supported: default, linear, dynamic, llama3, yarn"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "rope parameters: rope_type 'linear' needs factor"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True, sliding_window=4,
          layer_types=["full_attention", "sliding_attention"]), "mix full and sliding"),
    (dict(num_attention_heads=None), "has no 'num_attention_heads'"),
])
def test_bad_configs_are_refused(llama_dir, tmp_path, config, match):
    with pytest.raises(HFCheckpointError, match=match):
        from_hf(_edited(llama_dir, tmp_path, config=config))


def test_missing_and_unexpected_tensors(llama_dir, tmp_path):
    path = _edited(llama_dir, tmp_path, tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(HFCheckpointError, match="missing tensors model.layers.1.self_attn.k_proj.weight"):
        from_hf(path)
    shutil.rmtree(path)

    def extra(t):
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # old transformers saved it: ignored
    with pytest.raises(HFCheckpointError, match=r"1 unexpected tensor\(s\).*: model.layers.0.self_attn.q_proj.bias$"):
        from_hf(_edited(llama_dir, tmp_path, tensors=extra))


@pytest.mark.parametrize("overrides,match", [
    (dict(pos="alibi"), "pos = 'alibi'"),
    (dict(pos="learned", max_seq_len=64), "pos = 'learned'"),
    (dict(mlp_hidden=0), "no MLP"),
    (dict(attn_out_bias=True), "output but not on q/k/v"),
    (dict(attn_bias=True, attn_out_bias=True, attn_window=8), "sliding window"),
    (dict(layers=["attention", "mamba"]), "no Hugging Face architecture represents layers"),
    (dict(layers=["dilated"] * 2, dilated_segments=[8], dilated_rates=[1]), "represents layers \\['dilated'\\]"),
])
def test_to_hf_refuses_what_no_architecture_represents(tmp_path, overrides, match):
    config = {**dict(vocab_size=VOCAB, d_model=32, layers=["attention"] * 2, n_heads=4), **overrides}
    with pytest.raises(HFCheckpointError, match=match):
        to_hf(LanguageModel(ModelConfig(**config)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,match", [
    (dict(rope_scaling={"rope_type": "su", "factor": 2.0}), "model.rope_scaling: rope_type 'su' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "needs original_max_position_embeddings"),
    (dict(attn_window=0), "model.attn_window must be a positive integer"),
    (dict(attn_window=8, layers=["dilated"], dilated_segments=[8], dilated_rates=[1]), "attn_window applies"),
    (dict(attn_bias=1), "model.attn_bias must be true or false"),
    (dict(context_len=-1), "model.context_len"),
])
def test_config_validation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{"layers": ["attention"], **overrides})

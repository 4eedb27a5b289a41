"""llama.cpp's GGUF files in: ``from_gguf(path) -> (LanguageModel, tokenizer)``.

A GGUF file holds the model's hyperparameters and tokenizer as metadata and its tensors,
often quantized.  ``GGUFFile`` reads the metadata and the tensor table itself (a few dozen
lines, where the ``gguf`` package's ``GGUFReader`` takes seconds over a 50k-token vocabulary,
making numpy views of every string) and leaves the tensor data mapped, unread, until a
tensor is asked for.
The bit formats are the ``gguf`` package's: ``gguf.quants.dequantize`` turns F32, F16,
BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and the IQ types into fp32, and the
package's tables give each type's block size.  The tensors become fp32 under their
Hugging Face names and the metadata a Hugging Face config, which ``longctx.model.hf``
turns into a model as it does for a checkpoint directory.

Supported architectures (``general.architecture``): ``llama`` (Llama 2 and 3, SmolLM,
TinyLlama, Mistral as llama.cpp writes it) and ``qwen2``.  llama.cpp's converter permutes
the rows of ``attn_q`` and ``attn_k`` of ``llama`` models for its rotary layout (the two
halves of each head interleaved, as pairs of adjacent dimensions); ``_unpermute`` undoes
it exactly, back to the rotate-half layout of transformers and longctx.  ``qwen2`` files
are written unpermuted.  Refused, with the reason: mixtures of experts, partial RoPE,
per-dimension RoPE factors (``rope_freqs.weight``, Llama 3.1's scaling) and RoPE scaling
other than linear.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from longctx.model.hf_common import HFCheckpointError

__all__ = ["ARCHITECTURES", "GGUFError", "GGUFFile", "from_gguf"]

# GGUF architecture -> the Hugging Face architecture that holds the same model.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_VERSIONS = (2, 3)  # version 1 counted in 32 bits; llama.cpp has not written it since 2023
_DEFAULT_ALIGNMENT = 32


class GGUFError(HFCheckpointError):
    """A GGUF file is missing, corrupt, or holds a model longctx cannot run."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


class TensorInfo(NamedTuple):
    """Where a tensor's data lies in the file and how it is stored."""

    kind: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: rows first (GGUF lists the innermost dimension first)
    start: int  # byte offset in the file
    n_bytes: int


class _Reader:
    """Little-endian GGUF values read front to back from ``buf`` (``struct.error`` past its end)."""

    def __init__(self, buf: mmap.mmap, value_types) -> None:
        self.buf, self.pos = buf, 4  # after the magic
        V = value_types
        self.scalars = {int(kind): code for kind, code in (
            (V.UINT8, "B"), (V.INT8, "b"), (V.UINT16, "H"), (V.INT16, "h"), (V.UINT32, "I"), (V.INT32, "i"),
            (V.FLOAT32, "f"), (V.BOOL, "?"), (V.UINT64, "Q"), (V.INT64, "q"), (V.FLOAT64, "d"))}
        self.string_type, self.array_type = int(V.STRING), int(V.ARRAY)

    def read(self, code: str, count: int = 1) -> tuple:
        """``count`` values of the ``struct`` type ``code``."""
        layout = struct.Struct(f"<{count}{code}")
        values = layout.unpack_from(self.buf, self.pos)
        self.pos += layout.size
        return values

    def string(self) -> str:
        (n,) = self.read("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise struct.error(f"a string of {n:,} bytes runs past the end of the file")
        text = self.buf[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def value(self, kind: int) -> Any:
        """One metadata value of GGUF value type ``kind``: a number, bool, string or list."""
        if kind in self.scalars:
            return self.read(self.scalars[kind])[0]
        if kind == self.string_type:
            return self.string()
        if kind == self.array_type:
            (item,), (count,) = self.read("I"), self.read("Q")
            if item in self.scalars:
                return list(self.read(self.scalars[item], count))
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")


def _read_header(reader: _Reader, path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]]]:
    """``(metadata, [(tensor name, shape, type id, offset in the data)])``; ``reader`` ends after them."""
    (version,) = reader.read("I")
    if version & 0xFFFF == 0:  # the version's bytes swapped: written on a big-endian machine
        raise GGUFError(f"{path} is a big-endian GGUF file; convert it again on a little-endian machine "
                        "(llama.cpp's default)")
    if version not in _VERSIONS:
        raise GGUFError(f"{path} is GGUF version {version}; supported: {', '.join(map(str, _VERSIONS))}")
    n_tensors, n_values = reader.read("Q", 2)
    metadata = {}
    for _ in range(n_values):
        key = reader.string()
        metadata[key] = reader.value(reader.read("I")[0])
    table = []
    for _ in range(n_tensors):
        name = reader.string()
        (n_dims,) = reader.read("I")
        dims = reader.read("Q", n_dims)
        (kind,), (offset,) = reader.read("I"), reader.read("Q")
        table.append((name, tuple(reversed(dims)), kind, offset))
    return metadata, table


class GGUFFile:
    """A GGUF file's ``metadata`` (key -> value) and ``tensors`` (name -> ``TensorInfo``);
    ``array(name)`` dequantizes one tensor.  The tensor data is memory-mapped, not read,
    until then."""

    def __init__(self, path: str | Path) -> None:
        gguf = _gguf()
        self.path = path = Path(path)
        if path.is_dir():
            raise GGUFError(f"{path} is a directory; from_gguf reads one .gguf file (a Hugging Face checkpoint "
                            "directory loads with longctx.model.hf.from_hf)")
        if not path.is_file():
            raise GGUFError(f"GGUF file {path} does not exist")
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                                "convert the model with llama.cpp's convert_hf_to_gguf.py")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        reader = _Reader(self._map, gguf.GGUFValueType)
        try:
            self.metadata, table = _read_header(reader, path)
        except GGUFError:
            raise
        except (struct.error, UnicodeDecodeError, ValueError) as e:
            raise GGUFError(f"{path} is truncated or corrupt: its metadata or tensor table cannot be read ({e}); "
                            "download or convert it again") from None
        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path} is corrupt: general.alignment {alignment!r} is not a power of two")
        data_start = -(-reader.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, kind, offset in table:
            try:
                kind = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise GGUFError(f"{path}: tensor {name} has type id {kind}, which the installed gguf package does "
                                "not know; upgrade it (pip install -U gguf)") from None
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
            if not shape or shape[-1] % block:
                raise GGUFError(f"{path} is corrupt: tensor {name} of shape {shape} does not split into "
                                f"{kind.name} blocks of {block}")
            n_bytes = math.prod(shape) // block * block_bytes
            start = data_start + offset
            if start + n_bytes > len(self._map):
                raise GGUFError(f"{path} is truncated: tensor {name} ends at byte {start + n_bytes:,}, the file has "
                                f"{len(self._map):,}; download or convert it again")
            self.tensors[name] = TensorInfo(kind, shape, start, n_bytes)

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new fp32 array of its shape (``TensorInfo.shape``)."""
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        t = self.tensors[name]
        block, block_bytes = GGML_QUANT_SIZES[t.kind]
        raw = np.frombuffer(self._map, np.uint8, t.n_bytes, t.start)
        try:
            values = dequantize(raw.reshape(*t.shape[:-1], t.shape[-1] // block * block_bytes), t.kind)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {name} is stored as {t.kind.name}, which the installed gguf "
                            "package cannot dequantize; convert the model with another quantization (for "
                            "example Q8_0, Q4_K or F16)") from None
        # F32 comes back as a read-only view of the file, copied here; the other types as new arrays
        return np.require(values, np.float32, ["C", "W"])


def _config(file: GGUFFile) -> tuple[str, dict[str, Any]]:
    """``(Hugging Face architecture, config.json values)`` of the file's metadata."""
    meta, path = file.metadata, file.path
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")

    def key(name: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise GGUFError(f"{path}: metadata {arch}.{name} is missing; the file is incomplete")
        if isinstance(value, list):
            raise GGUFError(f"{path}: metadata {arch}.{name} has a value per layer ({value[:4]}...), which is not "
                            "supported (every layer of a longctx model has the same shape)")
        return value

    if key("expert_count", 0):
        raise GGUFError(f"{path}: a mixture of experts ({arch}.expert_count = {key('expert_count')}, e.g. Mixtral) "
                        "is not supported")
    heads, d_model = int(key("attention.head_count")), int(key("embedding_length"))
    head_dim = int(key("attention.key_length", d_model // heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: values of {key('attention.value_length')} dimensions per head, keys of {head_dim}: "
                        "not supported (attention with one head size)")
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{path}: RoPE on {key('rope.dimension_count')} of {head_dim} head dimensions (partial "
                        "rotary) is not supported")
    vocab = key("vocab_size", None) or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab:
        raise GGUFError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling != "none":
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported; supported: none, linear")
    return ARCHITECTURES[arch], {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": int(vocab),
        "hidden_size": d_model, "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)), "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length", 2048)), "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in file.tensors,
    }


def _layout(config: dict[str, Any], names: set[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (Hugging Face name, shape) of every tensor the model of ``config`` is
    made of, named and shaped as llama.cpp writes them (``output.weight`` when ``names`` has it)."""
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    block = {
        "attn_norm.weight": ("input_layernorm.weight", (d,)),
        "attn_q.weight": ("self_attn.q_proj.weight", (q, d)),
        "attn_k.weight": ("self_attn.k_proj.weight", (kv, d)),
        "attn_v.weight": ("self_attn.v_proj.weight", (kv, d)),
        "attn_output.weight": ("self_attn.o_proj.weight", (d, q)),
        "ffn_norm.weight": ("post_attention_layernorm.weight", (d,)),
        "ffn_gate.weight": ("mlp.gate_proj.weight", (ff, d)),
        "ffn_up.weight": ("mlp.up_proj.weight", (ff, d)),
        "ffn_down.weight": ("mlp.down_proj.weight", (d, ff)),
    }
    if config["model_type"] == "qwen2":
        block.update({f"attn_{p}.bias": (f"self_attn.{p}_proj.bias", (rows,)) for p, rows in (("q", q), ("k", kv),
                                                                                            ("v", kv))})
    layout = {"token_embd.weight": ("model.embed_tokens.weight", (vocab, d)),
              "output_norm.weight": ("model.norm.weight", (d,))}
    if "output.weight" in names:
        layout["output.weight"] = ("lm_head.weight", (vocab, d))
    for i in range(config["num_hidden_layers"]):
        layout.update({f"blk.{i}.{name}": (f"model.layers.{i}.{hf}", shape) for name, (hf, shape) in block.items()})
    return layout


def _listed(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _check_tensors(file: GGUFFile, config: dict[str, Any], layout: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """The file has exactly the tensors of ``layout``, of its shapes (besides RoPE factors of 1)."""
    path, arch = file.path, config["model_type"]
    missing = [name for name in layout if name not in file.tensors]
    if missing:
        raise GGUFError(f"{path}: tensor(s) {_listed(missing)} missing; the file is incomplete or not a whole "
                        f"{arch} model")
    for name, (_, shape) in layout.items():
        if file.tensors[name].shape != shape:
            raise GGUFError(f"{path}: tensor {name} has shape {file.tensors[name].shape}, the metadata implies {shape}")
    extra = [name for name in file.tensors if name not in layout and name != "rope_freqs.weight"]
    if extra:
        raise GGUFError(f"{path}: tensor(s) {_listed(extra)} have no place in a {arch} model; the file holds an "
                        "architecture variant longctx does not support")
    # llama.cpp stores Llama 3.1-style RoPE scaling as a factor per frequency
    if "rope_freqs.weight" in file.tensors and not np.all(file.array("rope_freqs.weight") == 1):
        raise GGUFError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, llama.cpp's form of Llama 3.1's "
                        "'llama3' RoPE scaling) are not supported")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k rows ``(n_head * head_dim, d)`` back in transformers' order.

    Per head, llama.cpp's row ``2 j + i`` (pair ``j``, member ``i``) is transformers' row
    ``i * head_dim / 2 + j`` (half ``i``, position ``j``)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_gguf(path: str | Path):
    """``(LanguageModel in eval mode, HFTokenizer)`` of a GGUF file, with fp32 weights.

    A missing, foreign, truncated or corrupt file, an unsupported architecture or
    quantization, or tensors that do not make the model raise ``GGUFError`` (a
    ``ValueError``) naming the problem; a tokenizer that cannot be rebuilt, ``DataError``."""
    from longctx.data.gguf_tokenizer import tokenizer_from_gguf
    from longctx.model.hf import model_from_tensors

    file = GGUFFile(path)
    arch, config = _config(file)
    tokenizer = tokenizer_from_gguf(file.metadata, file.path)
    layout = _layout(config, set(file.tensors))
    _check_tensors(file, config, layout)
    tensors = {}
    for name, (hf_name, _) in layout.items():
        w = file.array(name)
        if config["model_type"] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"])
        tensors[hf_name] = torch.from_numpy(w)
    return model_from_tensors(arch, config, tensors, file.path), tokenizer

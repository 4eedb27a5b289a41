"""The tokenizer stored in a GGUF file's metadata, rebuilt with Hugging Face ``tokenizers``.

Two kinds (``tokenizer.ggml.model``), each tokenizing as llama.cpp does:

- ``gpt2``: byte-level BPE (Llama 3, Qwen2, SmolLM): the vocabulary, the merges and the
  split pattern that ``tokenizer.ggml.pre`` names (llama.cpp's patterns; a file without
  one gets GPT-2's).  ``smollm``, ``starcoder`` and ``refact`` split digits one by one
  first, as llama.cpp does and their vocabularies were trained (transformers' GGUF tokenizer
  does not); Llama 3's takes a word that is itself a token whole (``ignore_merges``).
- ``llama``: SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral): merges
  recovered from the token scores (a merge ranks by the score of the token it makes), a
  ``▁`` for each space, and one before the text and after each special token unless
  ``add_space_prefix`` is false.

Control tokens (``token_type`` 3) and user-defined ones (4) become added tokens, so a chat
template's ``<|im_start|>`` encodes as one token when special tokens are allowed
(``HFTokenizer.encode_with_specials``).  bos, eos and padding come from their ids in the
metadata, the chat template from ``tokenizer.chat_template``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DataError
from .hf_tokenizer import HFTokenizer
from .tokenizer_base import import_tokenizers

# llama.cpp's token types used here (the others: 2 unknown, 5 unused, 6 byte)
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_PUNCTUATION_AND_SPACES = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# tokenizer.ggml.pre -> (the split pattern before byte-level BPE, as llama.cpp's llama-vocab.cpp
# has it; None: GPT-2's, which ByteLevel applies itself), whether digits split one by one first.
_PRE_TOKENIZERS: dict[str, tuple[str | None, bool]] = {
    "gpt-2": (None, False),
    "smollm": (None, True),
    "starcoder": (None, True),
    "refact": (None, True),
    "llama-bpe": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _PUNCTUATION_AND_SPACES, False),
    "qwen2": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _PUNCTUATION_AND_SPACES, False),
}
_PRE_TOKENIZERS["llama3"] = _PRE_TOKENIZERS["llama-v3"] = _PRE_TOKENIZERS["llama-bpe"]


def _token_name(tokens: list[str], meta: dict[str, Any], role: str, path: Path) -> str | None:
    """The token whose id ``tokenizer.ggml.{role}_token_id`` gives, or None without one."""
    index = meta.get(f"tokenizer.ggml.{role}_token_id")
    if index is None:
        return None
    if not 0 <= index < len(tokens):
        raise DataError(f"{path}: tokenizer.ggml.{role}_token_id {index} is outside the vocabulary "
                        f"(0..{len(tokens) - 1}); the file is corrupt")
    return tokens[index]


def _add_tokens(tk, hf, tokens: list[str], types: list[int]) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens."""
    for kind, add in ((_CONTROL, hf.add_special_tokens), (_USER_DEFINED, hf.add_tokens)):
        add([tk.AddedToken(tokens[i], special=kind == _CONTROL, normalized=False)
             for i, t in enumerate(types) if t == kind])


def _byte_level(tk, meta: dict[str, Any], tokens: list[str], types: list[int], path: Path):
    """A ``tokenizers.Tokenizer`` for ``tokenizer.ggml.model = gpt2``."""
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise DataError(f"{path}: tokenizer pre-tokenizer {pre!r} is not supported; supported: "
                        f"{', '.join(sorted(_PRE_TOKENIZERS))}")
    pattern, digits = _PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    vocab = {token: i for i, token in enumerate(tokens)}
    # Llama 3's tokenizer takes a word that is itself a token whole (ignore_merges), as its tokenizer.json says.
    hf = tk.Tokenizer(tk.models.BPE(vocab, merges, ignore_merges=pre.startswith("llama")))
    steps = [tk.pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if pattern is None:
        steps.append(tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated"),
                  tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    hf.pre_tokenizer = tk.pre_tokenizers.Sequence(steps)
    hf.decoder = tk.decoders.ByteLevel()
    return hf


def _sentencepiece(tk, meta: dict[str, Any], tokens: list[str], types: list[int], path: Path):
    """A ``tokenizers.Tokenizer`` for ``tokenizer.ggml.model = llama``."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise DataError(f"{path}: a SentencePiece ('llama') tokenizer needs tokenizer.ggml.scores for every token")
    vocab = {token: i for i, token in enumerate(tokens)}
    # A token made of two tokens is their merge, ranked by its own score (highest first).
    ranked = []
    for token, i in vocab.items():
        if types[i] != _NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = _token_name(tokens, meta, "unknown", path)
    hf = tk.Tokenizer(tk.models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    replace = tk.normalizers.Replace(" ", "▁")
    hf.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("▁"), replace] if prefix else [replace])
    decoders = [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if prefix:
        decoders.append(tk.decoders.Strip(" ", 1, 0))
    hf.decoder = tk.decoders.Sequence(decoders)
    return hf


def tokenizer_from_gguf(meta: dict[str, Any], path: str | Path) -> HFTokenizer:
    """The tokenizer described by a GGUF file's metadata ``meta`` (key -> value, as
    ``longctx.model.gguf.GGUFFile.metadata``), with its bos/eos tokens and chat template;
    ``path`` names the file in errors."""
    path = Path(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise DataError(f"{path} holds no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise DataError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens; "
                        "the file is corrupt")
    builders = {"gpt2": _byte_level, "llama": _sentencepiece}
    if kind not in builders:
        raise DataError(f"{path}: tokenizer model {kind!r} is not supported; supported: {', '.join(builders)}")
    tk = import_tokenizers()
    hf = builders[kind](tk, meta, list(tokens), types, path)
    _add_tokens(tk, hf, list(tokens), types)
    bos = _token_name(tokens, meta, "bos", path)
    # llama.cpp adds bos to SentencePiece tokenizers whose file does not say otherwise
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", kind == "llama"):
        hf.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    return HFTokenizer(hf, bos_token=bos, eos_token=_token_name(tokens, meta, "eos", path),
                       pad_token=_token_name(tokens, meta, "padding", path),
                       chat_template=meta.get("tokenizer.chat_template"))

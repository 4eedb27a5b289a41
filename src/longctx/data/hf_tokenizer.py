"""The tokenizer saved beside a Hugging Face checkpoint (``tokenizer.json``), for text in and out.

Llama-3 and Qwen2 ship byte-level BPE (GPT-2's printable byte alphabet); Llama-2 and
Mistral ship SentencePiece-style BPE (``▁`` for a space, ``<0xAB>`` byte-fallback
tokens).  Either way every token stands for a definite byte string, which is what
``TokenTable`` needs for decoding, streaming and bits-per-byte.  The one difference
from the text the tokenizer's own ``decode`` returns: SentencePiece prepends a space to
the text it encodes and strips it when decoding; here the first token of a text keeps it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import DataError
from .tokenizer_base import (
    CONFIG_FILE,
    MECHANISM_TOKENS,
    TOKENIZER_FILE,
    TokenizersBacked,
    byte_alphabet,
    read_tokenizer_json,
)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_parts(spec) -> list[dict]:
    """The decoder and, for a ``Sequence``, its members, flattened."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [part for d in spec.get("decoders", []) for part in _decoder_parts(d)]
    return [spec]


def _token_table(hf) -> list[bytes]:
    """Bytes of every token id; special tokens stand for nothing (b"")."""
    spec = json.loads(hf.to_str())
    parts = _decoder_parts(spec.get("decoder"))
    byte_level = any(p.get("type") == "ByteLevel" for p in parts)
    # SentencePiece-style decoders turn "▁" back into " " (Metaspace, or a Replace step).
    spaces = [p.get("replacement", "▁") for p in parts if p.get("type") == "Metaspace"]
    spaces += [p["pattern"].get("String") for p in parts
               if p.get("type") == "Replace" and p.get("content") == " " and "String" in p.get("pattern", {})]
    byte_fallback = any(p.get("type") == "ByteFallback" for p in parts)
    alphabet = byte_alphabet() if byte_level else None

    size = hf.get_vocab_size(with_added_tokens=True)
    table = [b""] * size
    added = hf.get_added_tokens_decoder()
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        if i >= size:
            continue
        if i in added:  # added tokens are written as plain text, specials as nothing
            table[i] = b"" if added[i].special else token.encode()
            continue
        match = _BYTE_TOKEN.fullmatch(token) if byte_fallback else None
        if match:
            table[i] = bytes([int(match.group(1), 16)])
        elif alphabet is not None:
            try:
                table[i] = bytes(alphabet[c] for c in token)
            except KeyError:
                table[i] = token.encode()
        else:
            for mark in spaces:
                token = token.replace(mark, " ")
            table[i] = token.encode()
    return table


def _token_name(value) -> str | None:
    """``bos_token`` etc. in a tokenizer_config.json: a string, ``{"content": ...}`` or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(TokenizersBacked):
    """Any Hugging Face ``tokenizer.json`` with the bos/eos tokens and chat template of its
    ``tokenizer_config.json``.

    ``add_bos`` says whether the tokenizer itself starts each text with bos (Llama does,
    Qwen2 does not); generation then starts a fresh session with it.  ``chat_template``
    (Jinja, as in transformers) formats a conversation (``longctx.generation.chat``).
    """

    kind = "hf"

    def __init__(self, hf_tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None) -> None:
        self._hf = hf_tokenizer
        self.chat_template = chat_template
        self._hf.encode_special_tokens = True  # text is data, not control tokens
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)

        def token_id(name: str | None, role: str) -> int | None:
            if name is None:
                return None
            if name not in vocab:
                raise DataError(f"the tokenizer's {role} token {name!r} is not in its vocabulary")
            return vocab[name]

        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = token_id(bos_token, "bos")
        self.eos_id = token_id(eos_token, "eos")
        self.pad_id = token_id(pad_token, "pad")
        # The mechanism tokens, where the vocabulary has them as special tokens (a pretrained
        # one has not: longctx.data.special_tokens.add_mechanism_tokens adds them).
        specials = {t.content: i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        self.pause_id, self.mem_id, self.backspace_id = (specials.get(MECHANISM_TOKENS[name])
                                                         for name in ("pause", "mem", "backspace"))
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        probe = hf_tokenizer.encode("a", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self._table = _token_table(hf_tokenizer)

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        """Read ``directory/tokenizer.json`` and the special tokens named in its ``tokenizer_config.json``."""
        directory = Path(directory)
        hf = read_tokenizer_json(directory / TOKENIZER_FILE,
                                 f"{directory} has no {TOKENIZER_FILE}; put the checkpoint's tokenizer beside it")
        config = {}
        if (directory / CONFIG_FILE).is_file():
            try:
                config = json.loads((directory / CONFIG_FILE).read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"'{directory / CONFIG_FILE}' is not valid JSON ({e})") from e
        template = config.get("chat_template")
        if (directory / CHAT_TEMPLATE_FILE).is_file():  # transformers >= 4.43 may write it apart
            template = (directory / CHAT_TEMPLATE_FILE).read_text()
        return cls(hf, **{key: _token_name(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")},
                   chat_template=template if isinstance(template, str) else None)

    def encode_with_specials(self, text: str) -> list[int]:
        """Token ids of ``text`` in which special tokens written out (``<|im_start|>``) are
        those tokens: for text the program formats, such as a chat template's output."""
        self._hf.encode_special_tokens = False
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        finally:
            self._hf.encode_special_tokens = True

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that ``load`` (and transformers) read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(directory / TOKENIZER_FILE))
        config = {"kind": self.kind, "vocab_size": self.vocab_size, "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "chat_template": self.chat_template}
        path = directory / CONFIG_FILE
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

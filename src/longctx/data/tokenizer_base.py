"""What every tokenizer shares: each token stands for a definite byte string.

That one table gives decoding, incremental (streaming) decoding and the per-token byte
counts used for bits-per-byte, so they always agree with each other.  ``TokenTable``
holds it; ``TokenizersBacked`` adds encoding through a Hugging Face ``tokenizers``
object.  The kinds (byte, BPE, Hugging Face) are in ``tokenizer`` and ``hf_tokenizer``.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import DataError

CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
# The tokens of the learned mechanisms (``longctx.data.special_tokens``): mechanism name -> token.
MECHANISM_TOKENS = {"pause": "<pause>", "mem": "<mem>", "backspace": "<backspace>"}


class StreamDecoder:
    """Turns token ids into text as they arrive.

    A character whose UTF-8 bytes are split over several tokens is emitted
    only once all its bytes have been pushed; invalid bytes become U+FFFD.
    """

    def __init__(self, table: list[bytes]):
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text completed by it (may be "")."""
        return self._utf8.decode(_lookup(self._table, token_id))

    def flush(self) -> str:
        """Return what is left over (a dangling partial character as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class TokenTable:
    """Shared behaviour of tokenizers defined by a token -> bytes table."""

    _table: list[bytes]
    add_bos = False  # whether texts start with bos (HF tokenizers that add it say so)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids` (a list, array or tensor); special tokens are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return b"".join(_lookup(self._table, i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """int64 array (vocab_size,): UTF-8 bytes each token stands for (specials 0)."""
        return np.array([len(b) for b in self._table], dtype=np.int64)

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for generated tokens."""
        return StreamDecoder(self._table)


def _lookup(table: list[bytes], token_id: int) -> bytes:
    token_id = int(token_id)
    if not 0 <= token_id < len(table):
        raise DataError(f"token id {token_id} is outside the vocabulary (0..{len(table) - 1})")
    return table[token_id]


def byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's) mapped back to the bytes it encodes.

    Byte-level BPE writes each byte as a printable character: printable
    Latin-1 bytes stand for themselves, the rest are shifted to 256+n.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "the BPE tokenizer needs the Hugging Face 'tokenizers' package: "
            "pip install 'longctx[bpe]'"
        ) from e
    return tokenizers


class TokenizersBacked(TokenTable):
    """Encoding through a wrapped `tokenizers.Tokenizer` (``self._hf``)."""

    _hf: object

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` for many texts at once (in parallel), as numpy arrays: the fast path for corpora."""
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets.
        encode_batch = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode_batch(texts, add_special_tokens=False)]

    def digest(self) -> str:
        """Identifies this exact tokenizer (for dataset fingerprints)."""
        return hashlib.sha256(self._hf.to_str().encode()).hexdigest()


def read_tokenizer_json(path: Path, missing: str):
    """The ``tokenizers.Tokenizer`` saved in ``path``; ``missing`` is the error when there is none."""
    if not path.is_file():
        raise DataError(missing)
    tk = import_tokenizers()
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"'{path}' is not a valid tokenizer.json ({e})") from e

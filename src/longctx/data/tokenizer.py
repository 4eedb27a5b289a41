"""Tokenizers: raw UTF-8 bytes, or byte-level BPE via Hugging Face `tokenizers`.

Both kinds describe every token by the bytes it stands for. That one table
gives decoding, incremental (streaming) decoding and the per-token byte
counts used for bits-per-byte, so they always agree with each other.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import DataError

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<pause>")
CONFIG_FILE = "tokenizer_config.json"
BPE_FILE = "tokenizer.json"


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


class _BytesTable:
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


class ByteTokenizer(_BytesTable):
    """Ids 0..255 are UTF-8 bytes; 256.. are special tokens.

    The vocabulary leaves room for a few more specials (264 in all) so that
    adding one later does not change the model's embedding size.
    """

    kind = "byte"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    pause_id = 259
    vocab_size = 264

    def __init__(self) -> None:
        self._table = [bytes([i]) for i in range(256)] + [b""] * (self.vocab_size - 256)

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`; no special tokens are added."""
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` for many texts at once, as numpy arrays: the fast path for corpora."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def digest(self) -> str:
        """Identifies this exact tokenizer (for dataset fingerprints)."""
        return hashlib.sha256(f"byte:{self.vocab_size}".encode()).hexdigest()


def _byte_alphabet() -> dict[str, int]:
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


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "the BPE tokenizer needs the Hugging Face 'tokenizers' package: "
            "pip install 'longctx[bpe]'"
        ) from e
    return tokenizers


class _HFBacked(_BytesTable):
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


class BPETokenizer(_HFBacked):
    """Byte-level BPE (any text round-trips) wrapping a `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self._hf = hf_tokenizer
        # Text that happens to contain "<eos>" etc. is data, not a control token.
        self._hf.encode_special_tokens = True
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        for name in SPECIAL_TOKENS:
            if name not in vocab:
                raise DataError(
                    f"BPE tokenizer has no special token {name}; "
                    "train one with BPETokenizer.train so it has "
                    + ", ".join(SPECIAL_TOKENS)
                )
        self.bos_id, self.eos_id, self.pad_id, self.pause_id = (vocab[n] for n in SPECIAL_TOKENS)
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        special_ids = {i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        alphabet = _byte_alphabet()
        self._table = [b""] * self.vocab_size
        for token, i in vocab.items():
            if i in special_ids:
                continue
            try:
                self._table[i] = bytes(alphabet[c] for c in token)
            except KeyError:
                raise DataError(
                    f"BPE token {token!r} is not written in the byte-level alphabet; "
                    "only byte-level BPE tokenizers (BPETokenizer.train) are supported"
                ) from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn a byte-level BPE vocabulary of at most `vocab_size` tokens from `texts`."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise DataError(
                f"BPE vocab_size {vocab_size} is too small: it must be at least {minimum} "
                "(256 bytes + 4 special tokens)"
            )
        tk = _import_tokenizers()
        hf = tk.Tokenizer(tk.models.BPE())
        # No prefix space: encode(text) must decode back to exactly `text`.
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a `tokenizer.json` written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"BPE tokenizer file '{path}' does not exist")
        tk = _import_tokenizers()
        try:
            hf = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"'{path}' is not a valid tokenizer.json ({e}); save it again") from e
        return cls(hf)

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` (Hugging Face format); return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / BPE_FILE
        self._hf.save(str(path))
        return path


Tokenizer = ByteTokenizer | BPETokenizer  # or data.hf_tokenizer.HFTokenizer (kind "hf")


def save_tokenizer(tok: Tokenizer, run_dir: str | Path) -> Path:
    """Record `tok` in `run_dir` (tokenizer_config.json, plus tokenizer.json for BPE)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tok.kind == "hf":
        return tok.save(run_dir)
    if isinstance(tok, BPETokenizer):
        tok.save(run_dir)
    config = {"kind": tok.kind, "vocab_size": tok.vocab_size}
    path = run_dir / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_tokenizer(run_dir_or_kind: str | Path) -> Tokenizer:
    """The tokenizer named by a kind ("byte"), a run directory or a tokenizer.json path."""
    if isinstance(run_dir_or_kind, str) and run_dir_or_kind == ByteTokenizer.kind:
        return ByteTokenizer()
    path = Path(run_dir_or_kind)
    if path.is_file():
        return BPETokenizer.load(path)
    if not path.is_dir():
        raise DataError(
            f"tokenizer '{run_dir_or_kind}' is neither 'byte' nor an existing run directory "
            "or tokenizer.json file"
        )
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise DataError(f"'{config_path}' is missing; the run directory does not record its tokenizer")
    try:
        config = json.loads(config_path.read_text())
        kind = config["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"'{config_path}' is corrupt ({e}); it should look like {{\"kind\": \"byte\"}}"
        ) from e
    if kind == ByteTokenizer.kind:
        tok: Tokenizer = ByteTokenizer()
    elif kind == BPETokenizer.kind:
        tok = BPETokenizer.load(path / BPE_FILE)
    elif kind == "hf":
        from .hf_tokenizer import HFTokenizer

        tok = HFTokenizer.load(path)
    else:
        raise DataError(f"'{config_path}' names unknown tokenizer kind {kind!r}; use 'byte', 'bpe' or 'hf'")
    expected = config.get("vocab_size", tok.vocab_size)
    if expected != tok.vocab_size:
        raise DataError(
            f"'{config_path}' says vocab_size {expected} but the tokenizer has {tok.vocab_size}; "
            "the run directory's tokenizer files do not belong together"
        )
    return tok

"""Tokenizers of longctx's own runs: raw UTF-8 bytes, or byte-level BPE trained with Hugging
Face ``tokenizers``; and saving and loading any kind (byte, BPE, a Hugging Face
``tokenizer.json``) in a run directory, dispatched by the ``kind`` it records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import DataError
from .hf_tokenizer import HFTokenizer
from .tokenizer_base import (
    CONFIG_FILE,
    MECHANISM_TOKENS,
    TOKENIZER_FILE,
    TokenizersBacked,
    TokenTable,
    byte_alphabet,
    import_tokenizers,
    read_tokenizer_json,
)

# Every BPE tokenizer has the first four; "<mem>" and "<backspace>" came later: a tokenizer
# saved before has no ids for them until ``special_tokens.add_mechanism_tokens``.
REQUIRED_TOKENS = ("<bos>", "<eos>", "<pad>", "<pause>")
SPECIAL_TOKENS = (*REQUIRED_TOKENS, "<mem>", "<backspace>")


class ByteTokenizer(TokenTable):
    """Ids 0..255 are UTF-8 bytes; 256.. are special tokens.

    The vocabulary leaves room for a few more specials (264 in all) so that
    adding one later does not change the model's embedding size.
    """

    kind = "byte"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    pause_id = 259
    mem_id = 260
    backspace_id = 261
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


class BPETokenizer(TokenizersBacked):
    """Byte-level BPE (any text round-trips) wrapping a `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self._hf = hf_tokenizer
        # Text that happens to contain "<eos>" etc. is data, not a control token.
        self._hf.encode_special_tokens = True
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        for name in REQUIRED_TOKENS:
            if name not in vocab:
                raise DataError(
                    f"BPE tokenizer has no special token {name}; "
                    "train one with BPETokenizer.train so it has "
                    + ", ".join(SPECIAL_TOKENS)
                )
        self.bos_id, self.eos_id, self.pad_id, self.pause_id = (vocab[n] for n in REQUIRED_TOKENS)
        specials = {t.content: i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        # Special tokens only: a merge of an old tokenizer may spell "<mem>" as text.
        self.mem_id, self.backspace_id = (specials.get(MECHANISM_TOKENS[n]) for n in ("mem", "backspace"))
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        special_ids = set(specials.values())
        alphabet = byte_alphabet()
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
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        tk = import_tokenizers()
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
        return cls(read_tokenizer_json(path, f"BPE tokenizer file '{path}' does not exist"))

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` (Hugging Face format); return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._hf.save(str(path))
        return path


Tokenizer = ByteTokenizer | BPETokenizer | HFTokenizer

# A run directory's tokenizer kind -> how to read it from that directory.
_LOADERS = {
    ByteTokenizer.kind: lambda directory: ByteTokenizer(),
    BPETokenizer.kind: lambda directory: BPETokenizer.load(directory / TOKENIZER_FILE),
    HFTokenizer.kind: HFTokenizer.load,
}


def save_tokenizer(tok: Tokenizer, run_dir: str | Path) -> Path:
    """Record `tok` in `run_dir` (tokenizer_config.json, plus tokenizer.json for BPE)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, HFTokenizer):
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
    if kind not in _LOADERS:
        raise DataError(f"'{config_path}' names unknown tokenizer kind {kind!r}; use one of {', '.join(_LOADERS)}")
    tok = _LOADERS[kind](path)
    expected = config.get("vocab_size", tok.vocab_size)
    if expected != tok.vocab_size:
        raise DataError(
            f"'{config_path}' says vocab_size {expected} but the tokenizer has {tok.vocab_size}; "
            "the run directory's tokenizer files do not belong together"
        )
    return tok

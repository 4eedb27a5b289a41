"""The tokens of the learned mechanisms, the same way for every tokenizer kind:
``<pause>`` (extra computation before answering), ``<mem>`` (the memory slots of a
recurrent memory transformer) and ``<backspace>`` (deletes the token before it).

Every tokenizer has ``pause_id``, ``mem_id`` and ``backspace_id``: the token's id, or None
where its vocabulary lacks it.

- byte: fixed ids 259, 260, 261, inside the room the vocabulary keeps for specials (264),
  so adding them never changed a model's embedding size;
- BPE: ``BPETokenizer.train`` makes them beside ``<bos>``, ``<eos>``, ``<pad>``; one saved
  before ``<mem>`` and ``<backspace>`` existed gets them from ``add_mechanism_tokens``;
- Hugging Face and GGUF tokenizers (``HFTokenizer``): ``add_mechanism_tokens`` appends the
  missing ones as special added tokens, after the pretrained vocabulary.

They are special tokens: they decode to nothing, and text that happens to contain
"<pause>" still encodes as text.  They live in the tokenizer's own files (the byte kind's
are fixed), so ``save_tokenizer`` / ``load_tokenizer`` keep them.  Appended ids lie beyond
a pretrained model's embedding: ``check_model_room`` says so before anything runs.
"""

from __future__ import annotations

from .errors import DataError
from .hf_tokenizer import HFTokenizer
from .tokenizer import BPETokenizer, Tokenizer
from .tokenizer_base import MECHANISM_TOKENS, import_tokenizers

__all__ = ["MECHANISM_TOKENS", "add_mechanism_tokens", "check_model_room", "mechanism_id"]


def mechanism_id(tok: Tokenizer, name: str) -> int:
    """The id of mechanism ``name`` (``"pause"``, ``"mem"``, ``"backspace"``) in ``tok``."""
    if name not in MECHANISM_TOKENS:
        raise DataError(f"unknown mechanism token {name!r}; choose one of {', '.join(MECHANISM_TOKENS)}")
    token_id = getattr(tok, f"{name}_id")
    if token_id is None:
        raise DataError(f"this {tok.kind} tokenizer has no {MECHANISM_TOKENS[name]} token; add it with "
                        "longctx.data.special_tokens.add_mechanism_tokens (its id comes after the vocabulary, "
                        "so the model needs room for it)")
    return token_id


def add_mechanism_tokens(tok: Tokenizer) -> Tokenizer:
    """``tok`` with every mechanism token: ``tok`` itself when it has them all, else a new
    tokenizer of the same kind with the missing ones appended as special tokens."""
    missing = [token for name, token in MECHANISM_TOKENS.items() if getattr(tok, f"{name}_id") is None]
    if not missing:  # the byte tokenizer always, a BPE tokenizer trained since they exist
        return tok
    tk = import_tokenizers()
    hf = tk.Tokenizer.from_str(tok._hf.to_str())  # a copy: ``tok`` stays as it was
    hf.add_special_tokens([tk.AddedToken(token, special=True, normalized=False) for token in missing])
    if isinstance(tok, BPETokenizer):
        return BPETokenizer(hf)
    return HFTokenizer(hf, bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                       chat_template=tok.chat_template)


def check_model_room(tok: Tokenizer, vocab_size: int, names=tuple(MECHANISM_TOKENS)) -> None:
    """Raise ``DataError`` unless a model with ``vocab_size`` embeddings has rows for the
    mechanism tokens ``names`` of ``tok`` (appended ids are beyond a pretrained model's)."""
    for name in names:
        token_id = mechanism_id(tok, name)
        if token_id >= vocab_size:
            raise DataError(f"{MECHANISM_TOKENS[name]} is token {token_id} but the model has {vocab_size} "
                            "embeddings: the token was added after the model was made, which has never "
                            "learned it; train (or fine-tune with grown embeddings) a model that has it")

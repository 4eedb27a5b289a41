"""The mechanism tokens (<pause>, <mem>, <backspace>) in every tokenizer kind: present or
added the same way, special (decode to nothing, text stays text), kept by save/load."""

import pytest

from longctx.data import (
    BPETokenizer,
    ByteTokenizer,
    DataError,
    HFTokenizer,
    load_tokenizer,
    save_tokenizer,
)
from longctx.data.special_tokens import (
    MECHANISM_TOKENS,
    add_mechanism_tokens,
    check_model_room,
    mechanism_id,
)
from longctx.data.tokenizer import REQUIRED_TOKENS

tk = pytest.importorskip("tokenizers")

TEXT = "a <pause> and a <backspace> written out stay text"


def _ids(tok):
    return {name: mechanism_id(tok, name) for name in MECHANISM_TOKENS}


def _check_special(tok):
    ids = _ids(tok)
    assert len(set(ids.values()) | {tok.bos_id, tok.eos_id}) == len(ids) + 2
    assert all(i < tok.vocab_size for i in ids.values())
    assert tok.decode([*tok.encode("ab"), *ids.values()]) == "ab"  # they stand for no text
    assert not set(ids.values()) & set(tok.encode(TEXT))
    assert tok.decode(tok.encode(TEXT)) == TEXT


def _round_trip(tok, run_dir):
    save_tokenizer(tok, run_dir)
    loaded = load_tokenizer(run_dir)
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert _ids(loaded) == _ids(tok)
    return loaded


def test_byte_tokenizer_has_fixed_ids(tmp_path):
    tok = ByteTokenizer()
    assert _ids(tok) == {"pause": 259, "mem": 260, "backspace": 261} and tok.vocab_size == 264
    assert add_mechanism_tokens(tok) is tok
    _check_special(tok)
    _round_trip(tok, tmp_path)


def test_trained_bpe_has_them(tmp_path):
    tok = BPETokenizer.train([TEXT * 5, "the quick brown fox\n" * 20], vocab_size=300)
    assert add_mechanism_tokens(tok) is tok
    _check_special(tok)
    _round_trip(tok, tmp_path)


def _old_bpe():
    """A BPE tokenizer as trained before <mem> and <backspace> existed."""
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=280, special_tokens=list(REQUIRED_TOKENS), show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([TEXT * 5], trainer)
    return BPETokenizer(hf)


def test_old_bpe_gets_them_appended(tmp_path):
    old = _old_bpe()
    assert old.mem_id is None and old.backspace_id is None and old.pause_id is not None
    with pytest.raises(DataError, match="no <mem> token; add it with .*add_mechanism_tokens"):
        mechanism_id(old, "mem")
    new = add_mechanism_tokens(old)
    assert old.mem_id is None  # the original is left alone
    assert new.pause_id == old.pause_id and (new.mem_id, new.backspace_id) == (old.vocab_size, old.vocab_size + 1)
    assert new.encode(TEXT) == old.encode(TEXT)
    _check_special(new)
    _round_trip(new, tmp_path)
    # A model made for the old vocabulary has no rows for the new ids.
    with pytest.raises(DataError, match="<mem> is token .* the model has .* embeddings"):
        check_model_room(new, old.vocab_size)
    check_model_room(new, old.vocab_size, names=("pause",))
    check_model_room(new, new.vocab_size)


def test_hf_tokenizer_gets_them_appended(tmp_path):
    from tests.data.test_hf_tokenizer import byte_level_dir

    hf_tok = HFTokenizer.load(byte_level_dir(tmp_path / "hf"))
    assert isinstance(hf_tok, HFTokenizer) and hf_tok.pause_id is None
    hf_tok.chat_template = "{{ messages }}"
    tok = add_mechanism_tokens(hf_tok)
    assert list(_ids(tok).values()) == [hf_tok.vocab_size + i for i in range(3)]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (hf_tok.bos_id, hf_tok.eos_id, True,
                                                                         "{{ messages }}")
    _check_special(tok)
    loaded = _round_trip(tok, tmp_path / "run")
    assert loaded.chat_template == "{{ messages }}" and loaded.bos_id == tok.bos_id


def test_gguf_tokenizer_gets_them_appended(tmp_path):
    pytest.importorskip("gguf")
    from longctx.data.gguf_tokenizer import tokenizer_from_gguf
    from tests.data.test_gguf_tokenizer import _meta

    tok = add_mechanism_tokens(tokenizer_from_gguf(_meta({}), tmp_path / "t.gguf"))
    _check_special(tok)
    _round_trip(tok, tmp_path / "run")


def test_unknown_mechanism_name():
    with pytest.raises(DataError, match="unknown mechanism token 'think'"):
        mechanism_id(ByteTokenizer(), "think")

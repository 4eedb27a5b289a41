"""Tokenizers: round trips, byte counts, streaming decode, saving in a run dir."""

import json
import sys

import numpy as np
import pytest

from longctx.data import BPETokenizer, ByteTokenizer, DataError, load_tokenizer, save_tokenizer

TEXT = "def f(x):\n    return x * 2  # héllo → 世界 🙂\n"


def test_byte_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode())
    assert tok.decode(ids) == TEXT
    specials = [tok.bos_id, tok.eos_id, tok.pad_id, tok.pause_id]
    assert specials == [256, 257, 258, 259] and tok.vocab_size == 264 and tok.kind == "byte"
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == TEXT
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a truncated character is replaced
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([264])


def test_byte_token_bytes():
    tb = ByteTokenizer().token_bytes()
    assert tb.dtype == np.int64 and tb.shape == (264,)
    assert (tb[:256] == 1).all() and (tb[256:] == 0).all()


def test_stream_decoder_waits_for_whole_character():
    tok = ByteTokenizer()
    dec = tok.stream_decoder()
    a, b, c = "世".encode()
    assert dec.push(ord("x")) == "x"
    assert dec.push(a) == ""
    assert dec.push(tok.pause_id) == ""
    assert dec.push(b) == ""
    assert dec.push(c) == "世"
    assert dec.push(a) == ""
    assert dec.flush() == "\ufffd"


@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("tokenizers")
    texts = [TEXT * 3, "the quick brown fox jumps over the lazy dog\n" * 20, "import os\nimport sys\n" * 10]
    return BPETokenizer.train(texts, vocab_size=300)


def test_bpe_round_trip_save_load(bpe, tmp_path):
    assert bpe.kind == "bpe" and bpe.vocab_size <= 300
    assert len({bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.pause_id}) == 4
    text = TEXT + "unseen ✓ text <eos> stays text"
    ids = bpe.encode(text)
    assert bpe.eos_id not in ids  # "<eos>" inside data is not a control token
    assert bpe.decode(ids) == text
    assert bpe.decode([bpe.bos_id, *ids, bpe.eos_id]) == text
    tb = bpe.token_bytes()
    assert tb.shape == (bpe.vocab_size,) and tb[bpe.eos_id] == 0
    assert tb[ids].sum() == len(text.encode())
    path = bpe.save(tmp_path)
    assert path.name == "tokenizer.json"
    loaded = BPETokenizer.load(path)
    assert loaded.encode(text) == ids and loaded.digest() == bpe.digest()


def test_bpe_stream_decoder_matches_decode(bpe):
    ids = bpe.encode(TEXT)
    dec = bpe.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == TEXT
    assert "\ufffd" not in "".join(pieces)


def test_bpe_vocab_too_small():
    pytest.importorskip("tokenizers")
    with pytest.raises(DataError, match="at least 262"):
        BPETokenizer.train(["abc"], vocab_size=100)


def test_save_load_tokenizer_run_dir(bpe, tmp_path):
    save_tokenizer(ByteTokenizer(), tmp_path / "byte_run")
    assert json.loads((tmp_path / "byte_run" / "tokenizer_config.json").read_text())["kind"] == "byte"
    assert isinstance(load_tokenizer(tmp_path / "byte_run"), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)

    save_tokenizer(bpe, tmp_path / "bpe_run")
    loaded = load_tokenizer(tmp_path / "bpe_run")
    assert loaded.kind == "bpe" and loaded.encode(TEXT) == bpe.encode(TEXT)
    assert load_tokenizer(tmp_path / "bpe_run" / "tokenizer.json").digest() == bpe.digest()


def test_load_tokenizer_errors_name_the_file(bpe, tmp_path):
    with pytest.raises(DataError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="neither"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer_config.json.*corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "bpe"}')
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bpe_without_tokenizers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"pip install 'longctx\[bpe\]'"):
        BPETokenizer.train(["abc"], vocab_size=300)

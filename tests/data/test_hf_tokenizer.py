"""Tokenizers saved beside Hugging Face checkpoints: byte-level BPE (Llama-3, Qwen2 style)
and SentencePiece-style BPE with byte fallback (Llama-2, Mistral style), built here."""

import json

import pytest

tk = pytest.importorskip("tokenizers")

from longctx.data import DataError, HFTokenizer, load_tokenizer, save_tokenizer  # noqa: E402

TEXTS = ["def f(x):\n    return x * 2\n", "héllo → 世界 🙂", "  two  spaces\tand a tab"]


def byte_level_dir(tmp_path, add_bos=True):
    """A Llama-3-like tokenizer: byte-level BPE, bos added by the post-processor."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(TEXTS * 20, trainer)
    if add_bos:
        hf.post_processor = tk.processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", hf.token_to_id(specials[0]))])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": specials[0], "eos_token": {"content": specials[1]}, "pad_token": None}))
    return tmp_path


def sentencepiece_dir(tmp_path):
    """A Llama-2-like tokenizer: "▁" for spaces, <0xAB> byte fallback, specials <unk> <s> </s>."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", *"abcdefhilnorstuwx", "▁t", "▁tw", "▁two", "re", "ret"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("▁t", "w"), ("▁tw", "o"), ("r", "e"), ("re", "t")]
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    hf.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("▁"), tk.normalizers.Replace(" ", "▁")])
    hf.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(),
                                       tk.decoders.Fuse(), tk.decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return tmp_path


def stream(tok, ids):
    dec = tok.stream_decoder()
    return "".join(dec.push(i) for i in ids) + dec.flush()


def test_byte_level_bytes_decode_and_stream(tmp_path):
    tok = HFTokenizer.load(byte_level_dir(tmp_path))
    assert tok.kind == "hf" and tok.add_bos
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] != tok.bos_id  # encode adds nothing
        assert tok.decode(ids) == text == stream(tok, ids)
        assert tok.token_bytes()[ids].sum() == len(text.encode())
    assert tok.decode([tok.bos_id, *tok.encode("x"), tok.eos_id]) == "x"  # specials stand for nothing


def test_sentencepiece_style_bytes_decode_and_stream(tmp_path):
    tok = HFTokenizer.load(sentencepiece_dir(tmp_path))
    assert tok.add_bos and (tok.bos_id, tok.eos_id) == (1, 2)
    for text in TEXTS:
        ids = tok.encode(text)
        # SentencePiece prepends a space to a text; its own decode strips it again.
        assert tok.decode(ids) == " " + text == stream(tok, ids)
        assert tok._hf.decode(ids) == text
    assert any(3 <= i < 259 for i in tok.encode("世界"))  # unknown characters fall back to bytes


def test_no_bos_is_not_added(tmp_path):
    tok = HFTokenizer.load(byte_level_dir(tmp_path, add_bos=False))
    assert tok.bos_id == 0 and not tok.add_bos


def test_run_directory_round_trip(tmp_path):
    tok = HFTokenizer.load(sentencepiece_dir(tmp_path / "hf"))
    save_tokenizer(tok, tmp_path / "run")
    again = load_tokenizer(tmp_path / "run")
    assert isinstance(again, HFTokenizer) and again.digest() == tok.digest()
    assert (again.bos_id, again.eos_id, again.add_bos, again.vocab_size) == (tok.bos_id, tok.eos_id, True, tok.vocab_size)
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_bad_directories(tmp_path):
    with pytest.raises(DataError, match="has no tokenizer.json"):
        HFTokenizer.load(tmp_path)
    d = byte_level_dir(tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(DataError, match="bos token '<nope>' is not in its vocabulary"):
        HFTokenizer.load(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        HFTokenizer.load(d)

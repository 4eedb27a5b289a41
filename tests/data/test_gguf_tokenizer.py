"""Tokenizers rebuilt from GGUF metadata tokenize as llama.cpp does (checked against
llama-cpp-python where it is installed) and as transformers' GGUF tokenizer wherever the two
agree; bos/eos, control tokens and the chat template come from the metadata; bad metadata is
refused by name.  The files are written here with ``gguf.GGUFWriter``."""

import functools
import json

import pytest

gguf = pytest.importorskip("gguf")
tk = pytest.importorskip("tokenizers")

from longctx.data import DataError  # noqa: E402
from longctx.data.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402
from longctx.model.gguf import GGUFFile  # noqa: E402

CONTROL, NORMAL, USER_DEFINED, UNKNOWN, BYTE = 3, 1, 4, 2, 6
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["def f(x):\n    return x * 2024 + 365\n", "héllo → 世界 🙂 don't I'M 12345 3.14159",
          "  two  spaces\tand a tab\n\n\nend 2024 2025 1999 the there hello world"]
# digits in runs (several digit tokens are in the vocabulary), contractions, blank runs, newlines, unicode
TEXTS = ["Hello 12345 don't I'M\n\n  x\ty 2024!", "naïve 日本 🙂 3.14159", "end\r\n\t 1999   two  spaces "]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@functools.cache
def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token types, merges)``: a byte-level BPE trained on ``CORPUS`` without
    splitting digits (so "202", "Ġ2024" are tokens), its three control tokens first, and at
    the end "Ġzebra", a token no merge makes."""
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tk.trainers.BpeTrainer(vocab_size=340, special_tokens=SPECIALS, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS * 20, trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["Ġzebra"]
    types = [CONTROL if t in SPECIALS else NORMAL for t in tokens]
    return tokens, types, [" ".join(m) for m in model["merges"]]


def write_tokenizer(writer, pre: str | None = "gpt-2", chat_template: str | None = TEMPLATE) -> int:
    """The byte-level tokenizer of ``byte_level_vocab`` as llama.cpp writes it (eos <|im_end|>,
    no bos added); returns the vocabulary size."""
    tokens, types, merges = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return len(tokens)


# A Llama-2-like SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, pieces scored by merge order.
SPM_PIECES = ["▁", *"abdehilnorstwx", "▁t", "he", "▁the", "er", "▁there", "re", "▁h", "ll", "▁he",
              "▁hell", "▁hello", "lo", "▁w", "or", "▁wor", "ld", "▁world", "▁▁", "in", "▁in"]
SPM_TOKENS = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *SPM_PIECES, "<|user|>"]
SPM_TEXTS = ["hello world", "the there  hello", "naïve\nworld", "wxyz 42"]
# where llama.cpp and transformers differ: a space before the text, an added token inside it
SPM_ONLY_LLAMA_CPP = [" leading", "hello<|user|>the"]


def write_sentencepiece(writer) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(SPM_TOKENS)
    writer.add_token_types([UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * len(SPM_PIECES), USER_DEFINED])
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_file(path, tokenizer=write_tokenizer, **options):
    """A GGUF file with ``tokenizer``'s metadata and a one-layer llama's hyperparameters (so
    transformers and llama.cpp read it), no tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64),
                       (writer.add_embedding_length, 32), (writer.add_feed_forward_length, 64),
                       (writer.add_head_count, 2), (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    tokenizer(writer, **options)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ours(path):
    return tokenizer_from_gguf(GGUFFile(path).metadata, path)


def transformers_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def llama_cpp_ids(path, texts):
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return [vocab.tokenize(text.encode(), add_bos=False, special=False) for text in texts]


@pytest.mark.parametrize("pre", ["gpt-2", None, "llama-bpe", "qwen2", "smollm"], ids=lambda pre: pre or "no-pre")
def test_byte_level_matches_transformers(tmp_path, pre):
    """Our ids are transformers' for each split pattern; a file without tokenizer.ggml.pre gets
    GPT-2's, as in transformers (llama.cpp then uses a 'default' pattern of its own)."""
    path = write_file(tmp_path / "t.gguf", pre=pre)
    tok, theirs = ours(path), transformers_tokenizer(path)
    for text in TEXTS:
        if pre == "smollm":
            # llama.cpp splits digits one by one before BPE (SmolLM was trained so: its vocabulary
            # has no token of two digits); transformers' GGUF tokenizer does not, so only
            # digit-free text can agree here.
            text = "".join(c for c in text if not c.isdigit())
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text
    # the patterns differ where they should: GPT-2's keeps the space with the digits, Llama 3's
    # cuts digit runs in threes, Qwen2's and SmolLM's into digits
    gpt2 = [" 123", "45"]
    pieces = {"gpt-2": gpt2, None: gpt2, "llama-bpe": [" ", "1", "23", "45"]}.get(pre, [" ", *"12345"])
    assert [tok.decode([i]) for i in tok.encode(" 12345")] == pieces


def test_llama3_takes_a_word_that_is_a_token_whole(tmp_path):
    """Llama 3 (ignore_merges): " zebra" is a token although no merge makes it; GPT-2 merges."""
    zebra = byte_level_vocab()[0].index("Ġzebra")
    assert ours(write_file(tmp_path / "llama3.gguf", pre="llama-bpe")).encode(" zebra") == [zebra]
    assert zebra not in ours(write_file(tmp_path / "gpt2.gguf", pre="gpt-2")).encode(" zebra")


def test_sentencepiece_matches_transformers(tmp_path):
    path = write_file(tmp_path / "spm.gguf", tokenizer=write_sentencepiece)
    tok, theirs = ours(path), transformers_tokenizer(path)
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == " " + text  # the space SentencePiece puts before the text is kept
    # merges by score: "▁hello" is one token; "ï" has no piece and falls back to its UTF-8 bytes
    assert tok.encode("hello") == [SPM_TOKENS.index("▁hello")]
    assert [SPM_TOKENS[i] for i in tok.encode("ï")] == ["▁", "<0xC3>", "<0xAF>"]
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.add_bos  # llama.cpp's default for SentencePiece
    assert SPM_TOKENS.index("<|user|>") in tok.encode("hello<|user|>the")  # user-defined: whole, even in data


@pytest.mark.parametrize("kind", ["gpt-2", "llama-bpe", "llama3", "llama-v3", "qwen2", "smollm", "starcoder", "refact",
                                  "sentencepiece"])
def test_matches_llama_cpp(tmp_path, kind):
    if kind == "sentencepiece":
        path, texts = write_file(tmp_path / "t.gguf", tokenizer=write_sentencepiece), SPM_TEXTS + SPM_ONLY_LLAMA_CPP
    else:
        path, texts = write_file(tmp_path / "t.gguf", pre=kind), TEXTS + [" zebra"]
    tok = ours(path)
    assert [tok.encode(text) for text in texts] == llama_cpp_ids(path, texts)


def test_special_tokens_and_chat_template(tmp_path):
    tokens = byte_level_vocab()[0]
    tok = ours(write_file(tmp_path / "t.gguf"))
    start, end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    assert tok.chat_template == TEMPLATE
    assert (tok.eos_id, tok.eos_token, tok.bos_id, tok.add_bos) == (end, "<|im_end|>", 0, False)
    written = "<|im_start|>user\nhi<|im_end|>"
    assert start not in tok.encode(written) and end not in tok.encode(written)  # text is data
    ids = tok.encode_with_specials(written)
    assert ids[0] == start and ids[-1] == end and tok.encode("user\nhi") == ids[1:-1]
    assert tok.decode(ids) == "user\nhi"  # special tokens stand for no text


def _meta(changes):
    tokens, types, merges = byte_level_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0}
    meta.update(changes)
    return {key: value for key, value in meta.items() if value is not None}


@pytest.mark.parametrize("changes,match", [
    ({"tokenizer.ggml.model": "bert"}, "tokenizer model 'bert' is not supported; supported: gpt2, llama"),
    ({"tokenizer.ggml.pre": "deepseek-coder"},
     "pre-tokenizer 'deepseek-coder' is not supported; supported: gpt-2, llama-bpe, llama-v3, llama3, qwen2, refact"),
    ({"tokenizer.ggml.tokens": None}, "holds no tokenizer"),
    ({"tokenizer.ggml.model": "llama"}, "needs tokenizer.ggml.scores for every token"),
    ({"tokenizer.ggml.token_type": [NORMAL] * 3}, r"token_type has 3 entries for \d+ tokens; the file is corrupt"),
    ({"tokenizer.ggml.bos_token_id": 10**6}, r"bos_token_id 1000000 is outside the vocabulary \(0\.\.\d+\)"),
])
def test_bad_metadata_is_refused(changes, match):
    with pytest.raises(DataError, match=match):
        tokenizer_from_gguf(_meta(changes), "model.gguf")

"""Prepared datasets: splits, meta, caching, sampling and evaluation windows."""


import numpy as np
import pytest
import torch

from longctx.data import (
    ByteTokenizer,
    DataError,
    TokenDataset,
    encode_corpus,
    iter_windows,
    prepare_dataset,
    read_meta,
    shard_dtype,
    validate_dataset,
)

TOK = ByteTokenizer()


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i} ✓\n" + "lorem ipsum " * (i + 1))
    return root


def split_documents(ds: TokenDataset) -> list[str]:
    """The documents of a split: every one ends with eos."""
    tokens = ds._tokens[0 : len(ds)]
    assert tokens[-1] == TOK.eos_id
    return [TOK.decode(d) for d in np.split(tokens, np.flatnonzero(tokens == TOK.eos_id) + 1)[:-1]]


def test_split_by_document(corpus, tmp_path):
    out = prepare_dataset(corpus, TOK, tmp_path / "ds", val_fraction=0.2, progress=False)
    meta = read_meta(out)
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 264 and meta["dtype"] == "uint16"
    train, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    train_docs, val_docs = split_documents(train), split_documents(val)
    texts = {p.read_text() for p in corpus.iterdir()}
    assert set(train_docs).isdisjoint(val_docs)
    assert set(train_docs) | set(val_docs) == texts
    assert 0 < len(val_docs) < 40 and val.n_documents == len(val_docs)
    for split, ds in (("train", train), ("val", val)):
        info = meta["splits"][split]
        assert info["tokens"] == len(ds) == sum((out / s["file"]).stat().st_size // 2 for s in info["shards"])
        assert info["bytes"] == ds.n_bytes == len(ds) - info["documents"]  # all but eos are bytes
    assert train.n_bytes + val.n_bytes == sum(len(t.encode()) for t in texts)


def test_min_val_documents_and_one_train_document(corpus, tmp_path):
    out = prepare_dataset(corpus, TOK, tmp_path / "a", val_fraction=0.0, min_val_documents=3, progress=False)
    assert read_meta(out)["splits"]["val"]["documents"] == 3
    two = tmp_path / "two"
    two.mkdir()
    (two / "x.txt").write_text("x")
    (two / "y.txt").write_text("y")
    out = prepare_dataset(two, TOK, tmp_path / "b", val_fraction=0.99, min_val_documents=5, progress=False)
    splits = read_meta(out)["splits"]
    assert splits["train"]["documents"] == 1 and splits["val"]["documents"] == 1


def test_cache_reuses_complete_dataset(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    first = prepare_dataset(corpus, TOK, progress=False)
    assert first.parent == tmp_path / "cache" / "datasets"
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    again = prepare_dataset(corpus, TOK, progress=False)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamps
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    (corpus / "doc00.txt").write_text("changed")
    assert prepare_dataset(corpus, TOK, progress=False) != first


def test_out_dir_must_be_new_empty_or_a_dataset(corpus, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(corpus, TOK, out, progress=False)
    prepare_dataset(corpus, TOK, out, val_fraction=0.5, progress=False)  # stale dataset is replaced
    assert read_meta(out)["val_fraction"] == 0.5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a longctx dataset"):
        prepare_dataset(corpus, TOK, tmp_path / "other", progress=False)


def test_single_document_is_cut_by_tokens(tmp_path):
    doc = tmp_path / "only.txt"
    doc.write_text("0123456789" * 100)
    out = prepare_dataset(doc, TOK, tmp_path / "ds", val_fraction=0.1, progress=False)
    meta = read_meta(out)
    assert meta["split_method"] == "single_document_tokens"
    assert meta["splits"]["val"]["tokens"] == 101 and meta["splits"]["train"]["tokens"] == 900
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == 1000


def test_sample_batch_deterministic_and_shifted(corpus, tmp_path):
    out = prepare_dataset(corpus, TOK, tmp_path / "ds", shard_tokens=500, progress=False)
    ds = TokenDataset(out, "train")
    assert len(ds.meta["splits"]["train"]["shards"]) > 3
    x1, y1 = ds.sample_batch(16, 64, torch.Generator().manual_seed(0))
    x2, y2 = ds.sample_batch(16, 64, torch.Generator().manual_seed(0))
    assert x1.dtype == y1.dtype == torch.int64 and x1.shape == y1.shape == (16, 64)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    # Row i is the stretch of the split (shards joined) at the i-th drawn start.
    shards = ds.meta["splits"]["train"]["shards"]
    flat = np.concatenate([np.fromfile(out / s["file"], "<u2") for s in shards])
    joined = torch.from_numpy(flat.astype(np.int64))
    starts = torch.randint(0, len(flat) - 64, (16,), generator=torch.Generator().manual_seed(0))
    assert any(s // 500 != (s + 64) // 500 for s in starts.tolist())  # some rows span two shards
    for start, row_x, row_y in zip(starts.tolist(), x1, y1):
        assert torch.equal(joined[start : start + 64], row_x)
        assert torch.equal(joined[start + 1 : start + 65], row_y)
    x3, _ = ds.sample_batch(16, 64, torch.Generator().manual_seed(1))
    assert not torch.equal(x1, x3)


def test_windows_cover_split_in_order(corpus, tmp_path):
    out = prepare_dataset(corpus, TOK, tmp_path / "ds", shard_tokens=300, progress=False)
    ds = TokenDataset(out, "train")
    batches = list(ds.windows(seq_len=50, batch_size=4))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == ((len(ds) - 1) // 50, 50)
    flat = torch.from_numpy(ds._tokens[0 : len(ds)].astype(np.int64))
    assert torch.equal(x.flatten(), flat[: x.numel()])
    assert torch.equal(y.flatten(), flat[1 : x.numel() + 1])
    assert len(list(ds.windows(50, 4, max_batches=2))) == 2


def test_windows_short_data():
    (x, y), = iter_windows(np.arange(10), seq_len=64, batch_size=8)  # only a partial window
    assert torch.equal(x, torch.arange(9)[None]) and torch.equal(y, torch.arange(1, 10)[None])
    with pytest.raises(DataError, match="at least 2 tokens"):
        list(iter_windows(np.arange(1), 8, 8))


def test_too_short_split(tmp_path):
    doc = tmp_path / "tiny.txt"
    doc.write_text("a few bytes")
    ds = TokenDataset(prepare_dataset(doc, TOK, tmp_path / "ds", progress=False), "val")
    with pytest.raises(DataError, match=r"has 1 tokens.*lower seq_len or add data"):
        ds.sample_batch(2, 8, torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match="no split 'test'"):
        TokenDataset(tmp_path / "ds", "test")
    with pytest.raises(DataError, match="meta.json"):
        TokenDataset(tmp_path, "train")


def test_validate_dataset(corpus, tmp_path):
    meta = read_meta(prepare_dataset(corpus, TOK, tmp_path / "ds", progress=False))
    validate_dataset(meta, TOK)
    with pytest.raises(DataError, match="byte tokenizer .vocab 264. but got the bpe tokenizer"):
        validate_dataset(meta, _FakeBPE())
    with pytest.raises(DataError, match="different"):
        validate_dataset({**meta, "tokenizer_digest": "0" * 64}, TOK)


class _FakeBPE:
    kind, vocab_size = "bpe", 4096

    def digest(self):
        return "f" * 64


def test_encode_corpus(corpus):
    tokens, n_bytes = encode_corpus(corpus, TOK)
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    assert n_bytes == sum(len(t.encode()) for t in texts)
    assert len(tokens) == n_bytes + len(texts) and (tokens == TOK.eos_id).sum() == len(texts)
    assert TOK.decode(tokens) == "".join(texts)


def test_shard_dtype():
    assert shard_dtype(264) == np.uint16 and shard_dtype(65536) == np.uint16
    assert shard_dtype(65537) == np.uint32

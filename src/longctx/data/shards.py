"""Token datasets on disk: memory-mapped shards described by a small meta.json.

Layout of a prepared dataset folder::

    meta.json          format, tokenizer, dtype, fingerprint, per-split shards
    train_00000.bin    raw little-endian token ids (uint16, or uint32 for big vocabs)
    val_00000.bin

Every document is stored as its tokens followed by `eos_id`, documents of
one split back to back. Splits are made by document so validation text is
never seen in training.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .corpus import document_names, read_documents, resolve_corpus
from longctx.validation import read_json_file

from .errors import DataError
from .tokenizer import Tokenizer

FORMAT = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
_HASH_BUCKETS = 10_000
_ENCODE_GROUP = 64


def shard_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds ids 0..vocab_size-1."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def cache_root() -> Path:
    """Where prepared datasets go when no folder is given: $LONGCTX_CACHE or ~/.cache/longctx."""
    return Path(os.environ.get("LONGCTX_CACHE") or "~/.cache/longctx").expanduser() / "datasets"


def prepare_dataset(
    spec: str | Path | None,
    tokenizer: Tokenizer,
    out_dir: str | Path | None = None,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = 2**24,
    min_val_documents: int = 1,
    progress: bool = True,
) -> Path:
    """Tokenize the corpus `spec` (see `resolve_corpus`) into a dataset folder; return it.

    A document goes to val when sha1(name) mod 10000 < val_fraction * 10000,
    topped up to `min_val_documents` while keeping one train document. A
    corpus of one document is instead cut at a token boundary. The folder
    defaults to `cache_root()/<fingerprint>`; an existing complete dataset
    with the same fingerprint is reused as is.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or min_val_documents < 0:
        raise DataError(
            f"need shard_tokens >= 1 and min_val_documents >= 0, "
            f"got {shard_tokens} and {min_val_documents}"
        )
    files = resolve_corpus(spec)
    settings = {
        "val_fraction": val_fraction,
        "min_val_documents": min_val_documents,
        "shard_tokens": shard_tokens,
    }
    fingerprint = _fingerprint(files, tokenizer, settings)
    out = Path(out_dir).expanduser() if out_dir is not None else cache_root() / fingerprint
    if _is_complete(out, fingerprint):
        return out
    if not _may_replace(out):
        raise DataError(
            f"output folder '{out}' already exists and is not a longctx dataset; "
            "pass a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the destination, then rename: readers never see half a dataset.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        dtype = shard_dtype(tokenizer.vocab_size)
        splits, split_method = _write_splits(files, tokenizer, tmp, dtype, settings, progress)
        meta = {
            "format": FORMAT,
            "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer_digest": tokenizer.digest(),
            "dtype": dtype.name,
            "eos_id": tokenizer.eos_id,
            "fingerprint": fingerprint,
            "source": "python-stdlib" if spec is None else str(spec),
            **settings,
            "split_method": split_method,
            "splits": splits,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, out, fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def encode_corpus(
    spec: str | Path | None, tokenizer: Tokenizer, *, progress: bool = False
) -> tuple[np.ndarray, int]:
    """All documents of `spec` as one token array (each followed by eos) and their UTF-8 byte count.

    For evaluating on a corpus as a whole: no split, nothing written to disk.
    """
    files = resolve_corpus(spec)
    dtype = shard_dtype(tokenizer.vocab_size)
    docs = [doc for _, doc in _encode_documents(files, tokenizer, dtype, progress)]
    tokens = np.concatenate(docs)
    return tokens, int(tokenizer.token_bytes()[tokens].sum())


def read_meta(path: str | Path) -> dict:
    """The meta.json of the dataset folder `path`."""
    meta_path = Path(path) / META_FILE
    meta = read_json_file(meta_path, missing=f"'{meta_path}' is missing; '{path}' is not a prepared dataset folder",
                          corrupt="delete the folder and prepare it again", error=DataError)
    required = {"format", "tokenizer", "vocab_size", "dtype", "splits"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not required <= meta.keys():
        raise DataError(
            f"'{meta_path}' is not format {FORMAT} dataset metadata; delete the folder and prepare it again"
        )
    return meta


def validate_dataset(meta: dict, tokenizer: Tokenizer) -> None:
    """Raise DataError unless the dataset described by `meta` was made with `tokenizer`."""
    made_with = f"the {meta.get('tokenizer')} tokenizer (vocab {meta.get('vocab_size')})"
    given = f"the {tokenizer.kind} tokenizer (vocab {tokenizer.vocab_size})"
    fix = "prepare the data again with this tokenizer, or use the tokenizer the data was made with"
    if meta.get("tokenizer") != tokenizer.kind or meta.get("vocab_size") != tokenizer.vocab_size:
        raise DataError(f"dataset was tokenized with {made_with} but got {given}; {fix}")
    if meta.get("tokenizer_digest", tokenizer.digest()) != tokenizer.digest():
        raise DataError(f"dataset was tokenized with a different {made_with}; {fix}")


class TokenDataset:
    """One split of a prepared dataset, memory-mapped read-only."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.split = split
        self.meta = read_meta(self.path)
        splits = self.meta["splits"]
        if split not in splits:
            raise DataError(f"dataset '{path}' has no split {split!r}; use one of {', '.join(splits)}")
        info = splits[split]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        arrays = []
        for shard in info["shards"]:
            file = self.path / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise DataError(
                    f"shard '{file}' is missing or not {expected} bytes as meta.json says; "
                    "delete the folder and prepare it again"
                )
            arrays.append(np.memmap(file, dtype=dtype, mode="r"))
        self._tokens = _Concat(arrays, dtype)
        self.n_bytes: int = info["bytes"]
        self.n_documents: int = info["documents"]

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens(self) -> np.ndarray:
        """The whole split as one array (a copy when it spans several shards)."""
        return self._tokens[0 : len(self)]

    def __repr__(self) -> str:
        return f"TokenDataset('{self.path}', {self.split!r}, tokens={len(self)}, bytes={self.n_bytes})"

    def sample_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (batch, seq_len) int64 and y = x shifted left by one token.

        Windows start anywhere (across document and shard boundaries); the
        starts come from `generator`, so equal generator states give equal batches.
        """
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        n = len(self)
        if n < seq_len + 1:
            raise DataError(
                f"the {self.split} split of '{self.path}' has {n} tokens but a batch needs "
                f"seq_len + 1 = {seq_len + 1}; lower seq_len or add data"
            )
        starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)
        rows = np.stack([self._tokens[s : s + seq_len + 1] for s in starts.tolist()])
        w = torch.from_numpy(rows.astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def windows(
        self, seq_len: int, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential non-overlapping windows in order; see `iter_windows`."""
        return iter_windows(self._tokens, seq_len, batch_size, max_batches)


def iter_windows(
    tokens: Sequence[int] | np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) int64 batches of consecutive windows covering `tokens` once, in order.

    Window i predicts tokens[i*seq_len+1 : (i+1)*seq_len+1]. A trailing
    partial window is dropped unless it is the only one (then it is shorter
    than seq_len); the last batch may hold fewer than batch_size windows.
    """
    if seq_len < 1 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise DataError(
            f"seq_len, batch_size and max_batches must be >= 1, "
            f"got {seq_len}, {batch_size} and {max_batches}"
        )
    n = len(tokens)
    if n < 2:
        raise DataError(f"evaluation needs at least 2 tokens, the data has {n}; add data")
    n_windows = (n - 1) // seq_len
    if n_windows == 0:
        seq_len, n_windows = n - 1, 1
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        first, last = b * batch_size, min((b + 1) * batch_size, n_windows)
        chunk = np.asarray(tokens[first * seq_len : last * seq_len + 1], dtype=np.int64)
        chunk = torch.from_numpy(chunk)
        yield chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)


class _Concat:
    """Several 1-D arrays read as one; slicing copies only the requested range."""

    def __init__(self, arrays: list[np.ndarray], dtype: np.dtype):
        self._arrays = arrays
        self._dtype = dtype
        self._starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(len(self))
        parts = []
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            offset = start - self._starts[i]
            part = self._arrays[i][offset : offset + stop - start]
            parts.append(part)
            start += len(part)
            i += 1
        return np.concatenate(parts) if parts else np.empty(0, self._dtype)


def _fingerprint(files: list[Path], tokenizer: Tokenizer, settings: dict) -> str:
    """Changes whenever the tokenizer, the settings or any file (path, size, mtime) changes."""
    h = hashlib.sha256()
    config = {"format": FORMAT, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
              "tokenizer_digest": tokenizer.digest(), **settings}
    h.update(json.dumps(config, sort_keys=True).encode())
    for path in files:
        st = path.stat()
        h.update(f"\n{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _is_complete(out: Path, fingerprint: str) -> bool:
    try:
        meta = read_meta(out)
        dtype = np.dtype(meta["dtype"])
        return meta["fingerprint"] == fingerprint and all(
            (out / s["file"]).stat().st_size == s["tokens"] * dtype.itemsize
            for split in meta["splits"].values()
            for s in split["shards"]
        )
    except (DataError, OSError, KeyError, TypeError):
        return False


def _may_replace(out: Path) -> bool:
    """Only a missing folder, an empty one or an (outdated) dataset may be overwritten."""
    if not out.exists():
        return True
    return out.is_dir() and (not any(out.iterdir()) or (out / META_FILE).is_file())


def _publish(tmp: Path, out: Path, fingerprint: str) -> None:
    """Move the finished `tmp` folder to `out`, replacing a stale dataset there."""
    if _is_complete(out, fingerprint):
        return  # another process finished the same dataset meanwhile; `tmp` is discarded
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _encode_documents(
    files: list[Path], tokenizer: Tokenizer, dtype: np.dtype, progress: bool
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, tokens + [eos]) per file, in order."""
    docs = read_documents(files)
    with tqdm(total=len(files), unit="file", desc="tokenizing", disable=not progress) as bar:
        # Groups of documents let a BPE tokenizer encode on all cores.
        while group := list(itertools.islice(docs, _ENCODE_GROUP)):
            names = [name for name, _ in group]
            for name, ids in zip(names, tokenizer.encode_arrays([text for _, text in group])):
                doc = np.empty(len(ids) + 1, dtype=dtype)
                doc[:-1] = ids
                doc[-1] = tokenizer.eos_id
                yield name, doc
            bar.update(len(group))


def _val_documents(names: list[str], val_fraction: float, min_val_documents: int) -> set[str]:
    """Names of the validation documents: a stable hash decides, counts are then enforced."""
    keys = {n: int(hashlib.sha1(n.encode()).hexdigest(), 16) % _HASH_BUCKETS for n in names}
    order = sorted(names, key=lambda n: (keys[n], n))
    n_val = sum(keys[n] < val_fraction * _HASH_BUCKETS for n in names)
    # Hash-chosen documents are a prefix of `order`; extending or cutting the
    # prefix keeps the choice stable when documents are added to the corpus.
    n_val = min(max(n_val, min_val_documents), len(names) - 1)
    return set(order[:n_val])


class _ShardWriter:
    """Appends tokens to `<split>_00000.bin`, `<split>_00001.bin`, ... of at most shard_tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self._directory, self._split, self._dtype = directory, split, dtype
        self._shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self._shard_tokens:
                self._open_next()
            room = self._shard_tokens - self.shards[-1]["tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            self._file.write(chunk.astype(self._dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += len(chunk)

    def _open_next(self) -> None:
        self.close()
        name = f"{self._split}_{len(self.shards):05d}.bin"
        self._file = open(self._directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_splits(
    files: list[Path], tokenizer: Tokenizer, out: Path, dtype: np.dtype, settings: dict, progress: bool
) -> tuple[dict, str]:
    """Tokenize `files` into shards under `out`; return the meta "splits" entry and split method."""
    token_bytes = tokenizer.token_bytes()
    writers = {s: _ShardWriter(out, s, dtype, settings["shard_tokens"]) for s in SPLITS}
    stats = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
    docs = _encode_documents(files, tokenizer, dtype, progress)
    try:
        if len(files) == 1:
            # One document cannot be split by document: cut its tokens instead.
            split_method = "single_document_tokens"
            (_, doc), = docs
            n_val = math.ceil(len(doc) * settings["val_fraction"])
            n_val = min(max(n_val, 1 if settings["min_val_documents"] else 0), len(doc) - 1)
            parts = [("train", doc[: len(doc) - n_val]), ("val", doc[len(doc) - n_val :])]
        else:
            split_method = "documents"
            val = _val_documents(document_names(files), settings["val_fraction"],
                                 settings["min_val_documents"])
            parts = (("val" if name in val else "train", doc) for name, doc in docs)
        for split, tokens in parts:
            writers[split].write(tokens)
            stats[split]["documents"] += bool(len(tokens))
            stats[split]["bytes"] += int(token_bytes[tokens].sum())
    finally:
        for w in writers.values():
            w.close()
    splits = {
        s: {"shards": writers[s].shards, "tokens": sum(x["tokens"] for x in writers[s].shards), **stats[s]}
        for s in SPLITS
    }
    return splits, split_method

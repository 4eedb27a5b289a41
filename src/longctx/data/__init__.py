"""Data: tokenizers, corpora and memory-mapped token datasets."""

from .corpus import default_corpus_files, document_names, read_documents, resolve_corpus
from .errors import DataError
from .hf_tokenizer import HFTokenizer
from .shards import (
    TokenDataset,
    cache_root,
    encode_corpus,
    iter_windows,
    prepare_dataset,
    read_meta,
    shard_dtype,
    validate_dataset,
)
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, save_tokenizer
from .tokenizer_base import StreamDecoder

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "StreamDecoder",
    "TokenDataset",
    "Tokenizer",
    "cache_root",
    "default_corpus_files",
    "document_names",
    "encode_corpus",
    "iter_windows",
    "load_tokenizer",
    "prepare_dataset",
    "read_documents",
    "read_meta",
    "resolve_corpus",
    "save_tokenizer",
    "shard_dtype",
    "validate_dataset",
]

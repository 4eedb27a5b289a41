"""The KV cache policies of attention layers and StreamingLLM's default sizes (no torch
here, so that the command line can name them without loading a model)."""

# every token; the last ``window``; the first ``sinks`` and the last ``window`` (StreamingLLM);
# sinks, window and the tokens between them in retrievable blocks (InfLLM: cache/recall.py).
CACHE_POLICIES = ("dense", "window", "sinks", "recall")
# StreamingLLM's cache: 4 attention sinks and a window of 1020 recent tokens.
DEFAULT_SINKS, DEFAULT_WINDOW = 4, 1020
# The recall cache's sizes: sinks, window, block, blocks retrieved per step, representative
# tokens per block, the position scheme of retrieved keys.
RECALL_DEFAULTS = {"sinks": 64, "window": 1024, "block": 128, "topk": 8, "repr_tokens": 4, "positions": "fixed"}


def check_policy(cache: str) -> str:
    if cache not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {cache!r}; choose one of {', '.join(CACHE_POLICIES)}")
    return cache

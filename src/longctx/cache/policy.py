"""The KV cache policies of attention layers and StreamingLLM's default sizes (no torch
here, so that the command line can name them without loading a model)."""

# every token; the last ``window``; the first ``sinks`` and the last ``window`` (StreamingLLM).
CACHE_POLICIES = ("dense", "window", "sinks")
# StreamingLLM's cache: 4 attention sinks and a window of 1020 recent tokens.
DEFAULT_SINKS, DEFAULT_WINDOW = 4, 1020


def check_policy(cache: str) -> str:
    if cache not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {cache!r}; choose one of {', '.join(CACHE_POLICIES)}")
    return cache

"""Sampling and generation on the model's state."""

from longctx.generation.generate import generate, prefill, stream
from longctx.generation.sampling import sample_next
from longctx.generation.text import generate_text, stream_text

__all__ = ["generate", "generate_text", "prefill", "sample_next", "stream", "stream_text"]

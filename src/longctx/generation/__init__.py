"""Sampling and generation on the model's state."""

from longctx.generation.generate import generate, stream
from longctx.generation.sampling import sample_next
from longctx.generation.text import generate_text, stream_text

__all__ = ["generate", "generate_text", "sample_next", "stream", "stream_text"]

"""Sampling and generation on the model's state."""

from longctx.generation.generate import generate, stream
from longctx.generation.sampling import sample_next

__all__ = ["generate", "sample_next", "stream"]

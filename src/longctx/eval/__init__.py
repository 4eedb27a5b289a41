"""Evaluation: loss, perplexity and bits per byte; baselines; streaming evaluation under
cache policies (StreamingLLM)."""

from longctx.eval.perplexity import evaluate_loss, unigram_bits_per_byte
from longctx.eval.stream import (
    StreamResult,
    StreamSegment,
    applicable_policies,
    plot_stream,
    stream_compare,
    stream_nll,
    stream_table,
)

__all__ = [
    "StreamResult",
    "StreamSegment",
    "applicable_policies",
    "evaluate_loss",
    "plot_stream",
    "stream_compare",
    "stream_nll",
    "stream_table",
    "unigram_bits_per_byte",
]

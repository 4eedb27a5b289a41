"""Evaluation: loss, perplexity and bits per byte; baselines."""

from longctx.eval.perplexity import evaluate_loss, unigram_bits_per_byte

__all__ = ["evaluate_loss", "unigram_bits_per_byte"]

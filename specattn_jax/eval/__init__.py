"""Evaluation: the decode-time perplexity protocol and the methods compared by it."""

from specattn_jax.eval.methods import METHODS, MethodFactory
from specattn_jax.eval.perplexity import PerplexityProtocol, decode_time_perplexity, make_windows

__all__ = [
    "METHODS",
    "MethodFactory",
    "PerplexityProtocol",
    "decode_time_perplexity",
    "make_windows",
]

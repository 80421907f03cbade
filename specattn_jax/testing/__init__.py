"""Test doubles: tiny random `transformers` Llama checkpoints and matching configs, and
perturbed copies of a model to serve as its draft."""

from specattn_jax.testing.tiny_models import (
    LLAMA3_ROPE_SCALING,
    max_relative_error,
    perturbed_copy,
    tiny_hf_config,
    tiny_llama,
    write_tiny_hf_checkpoint,
)

__all__ = [
    "LLAMA3_ROPE_SCALING",
    "max_relative_error",
    "perturbed_copy",
    "tiny_hf_config",
    "tiny_llama",
    "write_tiny_hf_checkpoint",
]

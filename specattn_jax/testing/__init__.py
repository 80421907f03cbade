"""Test doubles: tiny random `transformers` Llama checkpoints and matching configs."""

from specattn_jax.testing.tiny_models import (
    LLAMA3_ROPE_SCALING,
    max_relative_error,
    tiny_hf_config,
    tiny_llama,
    write_tiny_hf_checkpoint,
)

__all__ = [
    "LLAMA3_ROPE_SCALING",
    "max_relative_error",
    "tiny_hf_config",
    "tiny_llama",
    "write_tiny_hf_checkpoint",
]

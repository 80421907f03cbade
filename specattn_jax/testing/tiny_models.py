"""Tiny Llama configs shrunk from real `config.json` files, and random checkpoints of them.

`tiny_hf_config` starts from the fields of Llama-3-8B's config (llama3 RoPE scaling,
rope_theta 500000) and shrinks the sizes; `write_tiny_hf_checkpoint` saves a random
`transformers.LlamaForCausalLM` of it with `save_pretrained` (needs torch).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specattn_jax.config import LlamaConfig
from specattn_jax.convert._params import model_from_params, params_of
from specattn_jax.model import Llama

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_hf_config(
    *,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    llama3_rope: bool = False,
    vocab_size: int = 128,
    num_layers: int = 2,
    attention_bias: bool = False,
) -> dict:
    """An HF `config.json` dict: hidden 32, 4 query heads of dim 8, FFN 64."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": num_kv_heads,
        "head_dim": 8,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": attention_bias,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if llama3_rope:
        config["rope_scaling"] = dict(LLAMA3_ROPE_SCALING)
    return config


def write_tiny_hf_checkpoint(directory: str | Path, hf_config: dict, seed: int = 0, **save_kwargs):
    """Saves a random `LlamaForCausalLM` of `hf_config` to `directory`; returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf_config)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1.0; randomise them so parity tests see them
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, **save_kwargs)
    return model


def tiny_llama(seed: int = 0, dtype=jnp.float32, **config_kwargs) -> Llama:
    """A random NNX `Llama` of `tiny_hf_config(**config_kwargs)` (no torch needed)."""
    config = LlamaConfig.from_hf(tiny_hf_config(**config_kwargs))
    return Llama(config, dtype=dtype, rngs=nnx.Rngs(seed))


def _path_order(item) -> list:
    """Parameter paths in a fixed order (integers before names at each level), whatever
    the model's internal layout."""
    return [(isinstance(part, str), part) for part in item[0]]


def perturbed_copy(model: Llama, scale: float = 0.3, seed: int = 1) -> Llama:
    """A copy of `model` with relative Gaussian noise (`scale`) on every weight, in the
    model's dtype: a draft that agrees with the model often but not always."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    noisy = {
        path: value * (1 + scale * jax.random.normal(next(keys), value.shape, value.dtype))
        for path, value in sorted(params_of(model).items(), key=_path_order)
    }
    return model_from_params(model.config, noisy, model.dtype, source="perturbed copy")


def max_relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error relative to the tensor's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))

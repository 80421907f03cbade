"""specattn-jax: SpecAttn (draft-guided sparse attention in speculative decoding) in JAX.

Public API, re-exported here:
"""

# Models and checkpoints.
from specattn_jax.cache import KVCache
from specattn_jax.config import LlamaConfig, RopeScaling
from specattn_jax.errors import CheckpointError, IncompatibleModelsError, SpecAttnError
from specattn_jax.loading import load_pretrained
from specattn_jax.model import Llama, forward

# Decoding.
from specattn_jax.autoregressive import generate_autoregressive, stream_autoregressive
from specattn_jax.decoding import GenerationResult
from specattn_jax.sampling import Greedy, Sampling, make_sampler

__all__ = [
    "CheckpointError",
    "GenerationResult",
    "Greedy",
    "IncompatibleModelsError",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "Sampling",
    "SpecAttnError",
    "forward",
    "generate_autoregressive",
    "load_pretrained",
    "make_sampler",
    "stream_autoregressive",
]

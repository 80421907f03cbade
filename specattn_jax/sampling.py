"""Sampling rules: small frozen dataclasses with one job each.

`Greedy` picks the argmax. `Sampling` draws from the logits after temperature, top-k and
top-p (nucleus) filtering; its `probabilities()` is the filtered distribution itself, which
speculative sampling applies to draft and verifier alike. The knobs are pytree leaves
(arrays), so a new temperature or top-p does not recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specattn_jax.errors import SpecAttnError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Greedy:
    """Argmax decoding (the first index on ties)."""

    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """i32[...] tokens from f32[..., V] logits."""
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """f32[..., V]: one-hot on the argmax."""
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """Random sampling with temperature, then top-k (0 = off) and top-p (1.0 = off)."""

    temperature: jax.Array | float = 1.0
    top_k: jax.Array | int = 0
    top_p: jax.Array | float = 1.0

    def __post_init__(self):
        if isinstance(self.temperature, int | float) and self.temperature <= 0:
            raise SpecAttnError(f"temperature={self.temperature} must be > 0 (use Greedy for 0)")
        if isinstance(self.top_p, int | float) and not 0 < self.top_p <= 1:
            raise SpecAttnError(f"top_p={self.top_p} must be in (0, 1]")
        if isinstance(self.top_k, int) and self.top_k < 0:
            raise SpecAttnError(f"top_k={self.top_k} must be >= 0")

    def filtered_logits(self, logits: jax.Array) -> jax.Array:
        """f32[..., V] logits / temperature with the filtered-out tokens at -inf."""
        logits = logits.astype(jnp.float32) / self.temperature
        vocab = logits.shape[-1]
        descending = -jnp.sort(-logits, axis=-1)
        k = jnp.where(self.top_k > 0, jnp.minimum(self.top_k, vocab), vocab)
        kth_largest = jnp.take_along_axis(
            descending, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1
        )
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
        # Nucleus: keep the smallest prefix of the sorted distribution with mass >= top_p.
        descending = jnp.where(jnp.arange(vocab) < k, descending, -jnp.inf)
        sorted_probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        cutoff_index = jnp.sum(mass_before < self.top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(descending, cutoff_index, axis=-1)
        return jnp.where(logits < cutoff, -jnp.inf, logits)

    def probabilities(self, logits: jax.Array) -> jax.Array:
        return jax.nn.softmax(self.filtered_logits(logits), axis=-1)

    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        return jax.random.categorical(rng, self.filtered_logits(logits), axis=-1).astype(jnp.int32)


Sampler = Greedy | Sampling


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """`Greedy` at temperature 0, else `Sampling` (validating the values)."""
    if temperature < 0:
        raise SpecAttnError(f"temperature={temperature} must be >= 0")
    if not 0 < top_p <= 1:
        raise SpecAttnError(f"top_p={top_p} must be in (0, 1]")
    if temperature == 0:
        return Greedy()
    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p)

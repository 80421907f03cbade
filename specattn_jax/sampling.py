"""Sampling rules: small frozen dataclasses with one job each.

`Greedy` picks the argmax. `Sampling` draws from the logits after temperature, top-k, top-p
(nucleus) and min-p filtering, in transformers' order; its `probabilities()` is the filtered
distribution itself, which speculative sampling applies to draft and verifier alike. The knobs
are pytree leaves (arrays), so a new temperature or top-p does not recompile.

Both take a `repetition_penalty` (CTRL's, as transformers applies it: the raw logit of every
token already in the sequence, prompt included, is divided by the penalty when positive and
multiplied by it when negative). It depends on the sequence so far, so the decoder applies
it (`penalize`) before the filters, from its bool[B, V] record of the tokens seen; None (the
default) keeps no record. Turning it on or off recompiles; changing its value does not.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specattn_jax.errors import SpecAttnError


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Penalized:
    """The repetition penalty both samplers share (None: off)."""

    repetition_penalty: jax.Array | float | None = None

    def __post_init__(self):
        penalty = self.repetition_penalty
        if isinstance(penalty, int | float) and not penalty > 0:
            raise SpecAttnError(f"repetition_penalty={penalty} must be > 0 (1.0 is no penalty)")

    @property
    def tracks_seen(self) -> bool:
        """Whether the decoder must keep the tokens seen (static: the pytree's structure)."""
        return self.repetition_penalty is not None

    def penalize(self, logits: jax.Array, seen: jax.Array | None) -> jax.Array:
        """f32[..., V] logits with the penalty applied to the tokens of bool[..., V] `seen`."""
        logits = logits.astype(jnp.float32)
        if self.repetition_penalty is None:
            return logits
        penalized = jnp.where(
            logits < 0, logits * self.repetition_penalty, logits / self.repetition_penalty
        )
        return jnp.where(seen, penalized, logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Greedy(_Penalized):
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
class Sampling(_Penalized):
    """Random sampling with temperature, then top-k (0 = off), top-p (1.0 = off) and min-p
    (0.0 = off: keep the tokens at least `min_p` times as likely as the likeliest)."""

    temperature: jax.Array | float = 1.0
    top_k: jax.Array | int = 0
    top_p: jax.Array | float = 1.0
    min_p: jax.Array | float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.temperature, int | float) and self.temperature <= 0:
            raise SpecAttnError(f"temperature={self.temperature} must be > 0 (use Greedy for 0)")
        if isinstance(self.top_k, int) and self.top_k < 0:
            raise SpecAttnError(f"top_k={self.top_k} must be >= 0")
        _check_mass_filters(self.top_p, self.min_p)

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
        # Nucleus, summed from the unlikely end as transformers does: drop the tokens whose
        # mass together with every less likely token's is at most 1 - top_p. Off at 1.0,
        # where a sum from the likely end would round to 1 early and cut the tail.
        descending = jnp.where(jnp.arange(vocab) < k, descending, -jnp.inf)
        sorted_probs = jax.nn.softmax(descending, axis=-1)
        tail_mass = jnp.cumsum(sorted_probs[..., ::-1], axis=-1)[..., ::-1]
        keep = (tail_mass > 1 - self.top_p) | (self.top_p >= 1)
        keep = keep.at[..., 0].set(True)
        cutoff_index = jnp.sum(keep, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(descending, cutoff_index, axis=-1)
        # Min-p: p >= min_p * p_max, i.e. logit >= max logit + log(min_p) (log 0 = -inf).
        cutoff = jnp.maximum(cutoff, descending[..., :1] + jnp.log(self.min_p))
        return jnp.where(logits < cutoff, -jnp.inf, logits)

    def probabilities(self, logits: jax.Array) -> jax.Array:
        return jax.nn.softmax(self.filtered_logits(logits), axis=-1)

    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        return jax.random.categorical(rng, self.filtered_logits(logits), axis=-1).astype(jnp.int32)


Sampler = Greedy | Sampling


def _check_mass_filters(top_p, min_p) -> None:
    """Refuses top_p outside (0, 1] and min_p outside [0, 1] (traced values pass)."""
    if isinstance(top_p, int | float) and not 0 < top_p <= 1:
        raise SpecAttnError(f"top_p={top_p} must be in (0, 1]")
    if isinstance(min_p, int | float) and not 0 <= min_p <= 1:
        raise SpecAttnError(f"min_p={min_p} must be in [0, 1]")


def mark_seen(seen: jax.Array | None, tokens: jax.Array, valid: jax.Array | None = None):
    """bool[B, V] `seen` with the i32[B, K] (or i32[B]) `tokens` marked, where bool `valid`
    (same shape, default all); None stays None (no repetition penalty)."""
    if seen is None:
        return None
    tokens = tokens.reshape(tokens.shape[0], -1)
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid.reshape(tokens.shape)
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    return seen.at[rows, tokens].max(valid)


def seen_before_each(seen: jax.Array | None, tokens: jax.Array) -> jax.Array | None:
    """bool[B, K + 1, V]: row i is bool[B, V] `seen` with `tokens[:, :i]` (i32[B, K]) marked:
    what the position after i of the tokens has seen. None stays None."""
    if seen is None:
        return None
    rows = [seen]
    for index in range(tokens.shape[1]):
        rows.append(mark_seen(rows[-1], tokens[:, index]))
    return jnp.stack(rows, axis=1)


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
) -> Sampler:
    """`Greedy` at temperature 0, else `Sampling` (validating the values); a repetition
    penalty of 1.0 is none (no record of the tokens seen is kept)."""
    if temperature < 0:
        raise SpecAttnError(f"temperature={temperature} must be >= 0")
    _check_mass_filters(top_p, min_p)
    penalty = None if repetition_penalty == 1.0 else repetition_penalty
    if temperature == 0:
        return Greedy(repetition_penalty=penalty)
    return Sampling(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=penalty,
    )  # fmt: skip

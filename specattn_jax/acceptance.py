"""Acceptance rules of speculative decoding: small frozen dataclasses with one job each.

A rule samples tokens (the draft's proposals) and decides, from the draft and verifier
logits, how many drafted tokens to keep and which token follows them.

- `GreedyAcceptance`: the draft proposes its argmax; a drafted token is kept while it equals
  the verifier's argmax; the verifier's argmax follows. The output is exactly the verifier's
  greedy decoding.
- `SpeculativeSampling`: Leviathan et al. / Chen et al. Keep drafted token x with probability
  min(1, p(x) / q(x)); at the first rejection draw from normalize(max(0, p - q)); if all are
  kept, draw the bonus token from the verifier's next distribution. Temperature, top-k,
  top-p and min-p filter p and q alike. The output is distributed exactly as the verifier's
  sampling.

Both take logits with the sampler's repetition penalty already applied (the decoder applies
it, from the tokens each position has seen: `rule.sampler.penalize`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specattn_jax.sampling import Greedy, Sampler, Sampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class GreedyAcceptance:
    """Greedy acceptance: keep the longest prefix of drafts equal to the verifier's argmax,
    then the verifier's argmax at the first mismatch (or the bonus token after all gamma).
    Speculative decoding with it returns exactly the verifier's greedy tokens."""

    sampler: Greedy = Greedy()

    def sample(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """i32[B] tokens drawn from f32[B, V] logits (draft proposals, first tokens)."""
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def accept(
        self,
        drafted: jax.Array,  # i32[B, gamma]
        draft_logits: jax.Array,  # f32[B, gamma, V]
        verifier_logits: jax.Array,  # f32[B, gamma + 1, V]
        rng: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns (i32[B] drafted tokens kept, i32[B] the token that follows them)."""
        del draft_logits, rng
        targets = jnp.argmax(verifier_logits, axis=-1).astype(jnp.int32)  # [B, gamma + 1]
        num_accepted = _leading_true(drafted == targets[:, :-1])
        return num_accepted, jnp.take_along_axis(targets, num_accepted[:, None], axis=1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeculativeSampling:
    sampling: Sampling

    @property
    def sampler(self) -> Sampling:
        return self.sampling

    def sample(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        return self.sampling.get_next_tokens(logits, rng)

    def accept(self, drafted, draft_logits, verifier_logits, rng):
        """Returns (i32[B] drafted tokens kept, i32[B] the token that follows them)."""
        accept_key, resample_key = jax.random.split(rng)
        q = self.sampling.probabilities(draft_logits)  # [B, gamma, V]
        p = self.sampling.probabilities(verifier_logits)  # [B, gamma + 1, V]
        q_drafted = jnp.take_along_axis(q, drafted[..., None], axis=-1)[..., 0]
        p_drafted = jnp.take_along_axis(p[:, :-1], drafted[..., None], axis=-1)[..., 0]
        uniform = jax.random.uniform(accept_key, drafted.shape)
        num_accepted = _leading_true(uniform * q_drafted < p_drafted)
        p_next = jnp.take_along_axis(p, num_accepted[:, None, None], axis=1)[:, 0]
        q_next = jnp.take_along_axis(
            jnp.pad(q, ((0, 0), (0, 1), (0, 0))), num_accepted[:, None, None], axis=1
        )[:, 0]  # zeros at index gamma: the bonus draws from p itself
        residual = jnp.maximum(p_next - q_next, 0.0)
        residual_mass = residual.sum(axis=-1, keepdims=True)
        # p == q leaves no residual; rejection then had probability 0, so fall back to p.
        next_dist = jnp.where(
            residual_mass > 0, residual / jnp.maximum(residual_mass, 1e-30), p_next
        )
        next_token = jax.random.categorical(resample_key, jnp.log(next_dist), axis=-1)
        return num_accepted, next_token.astype(jnp.int32)


AcceptanceRule = GreedyAcceptance | SpeculativeSampling


def acceptance_for(sampler: Sampler) -> AcceptanceRule:
    """The rule that preserves `sampler`'s output distribution."""
    if isinstance(sampler, Greedy):
        return GreedyAcceptance(sampler=sampler)
    return SpeculativeSampling(sampling=sampler)


def _leading_true(mask: jax.Array) -> jax.Array:
    """i32[B]: the number of leading True values of each row of bool[B, N]."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)

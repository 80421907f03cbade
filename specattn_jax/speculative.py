"""Speculative decoding as one pure, jit-compiled step: `spec_step(state) -> state`.

Each step, for every sequence of the batch:
  1. the draft proposes `gamma` tokens (a `lax.scan` of one-token draft forwards, its KV
     cache updated in place), reporting its attention over the context as it goes;
  2. the verifier runs once on the `gamma + 1` new positions (the pending token and the
     drafts), attending densely or as the selector's plan says (SpecAttn);
  3. the acceptance rule keeps a prefix of the drafts and supplies the next token;
  4. both caches roll back to the accepted length (setting `lengths`).

Positions: a sequence of `seq_len` tokens (prompt + generated) has its last token *pending*:
in neither cache yet. At a step's start the verifier cache holds `seq_len - 1` entries and
the draft cache `seq_len - 2`; the draft's first forward re-feeds the two last tokens, which
rewrites one entry with identical values when the previous step rejected a draft, and fills
the missing one when it accepted them all. So every step has the same shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specattn_jax import autoregressive
from specattn_jax.acceptance import AcceptanceRule, acceptance_for
from specattn_jax.cache import KVCache
from specattn_jax.decoding import (
    DecodeProgress,
    GenerationResult,
    check_fits_cache,
    pad_prompts,
    run_to_completion,
    stream,
)
from specattn_jax.errors import IncompatibleModelsError, SpecAttnError
from specattn_jax.model import Llama
from specattn_jax.sampling import Greedy, Sampler


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecConfig:
    """Static settings of speculative decoding.

    Attributes:
      gamma: tokens drafted per step (>= 1).
    """

    gamma: int = 4

    def __post_init__(self):
        if not isinstance(self.gamma, int) or self.gamma < 1:
            raise SpecAttnError(f"gamma={self.gamma} must be an integer >= 1")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """Everything a speculative step reads and writes.

    Attributes:
      progress: generated tokens, budgets, done flags.
      draft_cache: the draft's KV cache.
      verifier_cache: the verifier's KV cache.
      seq_lengths: i32[B] prompt + generated tokens; the last one is pending.
      last_two: i32[B, 2] the tokens at positions seq_len - 2 and seq_len - 1.
      key: PRNG key; the prefill uses `fold_in(key, 0)`, step `i` `fold_in(key, i + 1)`.
      step: i32[] steps taken.
      drafted: i32[B] draft tokens proposed while the sequence was active.
      accepted: i32[B] draft tokens kept.
      active_steps: i32[B] steps taken while the sequence was active.
    """

    progress: DecodeProgress
    draft_cache: KVCache
    verifier_cache: KVCache
    seq_lengths: jax.Array  # i32[B]
    last_two: jax.Array  # i32[B, 2]
    key: jax.Array
    step: jax.Array  # i32[]
    drafted: jax.Array  # i32[B]
    accepted: jax.Array  # i32[B]
    active_steps: jax.Array  # i32[B]


@dataclasses.dataclass(frozen=True)
class _Models:
    """The static halves of the split models (hashable graph definitions)."""

    draft: nnx.GraphDef
    verifier: nnx.GraphDef


def draft_tokens(
    draft: Llama,
    cache: KVCache,
    last_two: jax.Array,  # i32[B, 2]
    rule: AcceptanceRule,
    key: jax.Array,
    gamma: int,
) -> tuple[jax.Array, jax.Array, jax.Array, KVCache]:
    """Proposes `gamma` tokens per sequence.

    `cache.lengths` must be the position of `last_two[:, 0]`. Returns the drafted tokens
    i32[B, gamma], their logits f32[B, gamma, V], the draft's head-mean attention of each
    drafting query over the cache f32[gamma, L_d, B, S], and the cache (lengths advanced by
    gamma + 1).
    """
    logits, cache, attention = draft(last_two, cache, return_attention=True)
    first = rule.sample(logits[:, 1], jax.random.fold_in(key, 0))

    def one_token(carry, index):
        token, cache = carry
        logits, cache, attention = draft(token[:, None], cache, return_attention=True)
        next_token = rule.sample(logits[:, 0], jax.random.fold_in(key, index))
        return (next_token, cache), (token, logits[:, 0], attention[:, :, 0])

    (last, cache), (tokens, step_logits, step_attention) = jax.lax.scan(
        one_token, (first, cache), jnp.arange(1, gamma)
    )
    # scan collected the inputs of steps 1..gamma-1: d_1..d_{gamma-1}; d_gamma is `last`.
    tokens = jnp.concatenate([tokens.T, last[:, None]], axis=1)
    all_logits = jnp.concatenate([logits[:, 1:2], step_logits.transpose(1, 0, 2)], axis=1)
    all_attention = jnp.concatenate([attention[None, :, :, 1], step_attention], axis=0)
    return tokens, all_logits, all_attention, cache


def spec_step(models: _Models, params, rule: AcceptanceRule, eos_id, gamma: int, state: SpecState):
    """One speculative step for every sequence (see the module docstring)."""
    draft = nnx.merge(models.draft, params[0])
    verifier = nnx.merge(models.verifier, params[1])
    active = ~state.progress.done
    step_key = jax.random.fold_in(state.key, state.step + 1)
    draft_key, accept_key = jax.random.split(step_key)

    with jax.named_scope("draft"):
        draft_cache = state.draft_cache.with_lengths(state.seq_lengths - 2)
        drafted, draft_logits, _, draft_cache = draft_tokens(
            draft, draft_cache, state.last_two, rule, draft_key, gamma
        )
    with jax.named_scope("verify"):
        verify_tokens = jnp.concatenate([state.last_two[:, 1:], drafted], axis=1)
        verifier_cache = state.verifier_cache.with_lengths(state.seq_lengths - 1)
        verifier_logits, verifier_cache, _ = verifier(verify_tokens, verifier_cache)
    with jax.named_scope("accept"):
        num_accepted, next_token = rule.accept(drafted, draft_logits, verifier_logits, accept_key)
        offsets = jnp.arange(gamma + 1)[None, :]
        padded_drafts = jnp.pad(drafted, ((0, 0), (0, 1)))
        new_tokens = jnp.where(offsets == num_accepted[:, None], next_token[:, None], padded_drafts)
        progress, taken = state.progress.append(new_tokens, num_accepted + 1, eos_id)
        seq_lengths = state.seq_lengths + taken
        history = jnp.concatenate([state.last_two, new_tokens], axis=1)
        last_two = jnp.take_along_axis(history, taken[:, None] + jnp.arange(2)[None, :], axis=1)
    return SpecState(
        progress=progress,
        draft_cache=draft_cache.with_lengths(seq_lengths - 2),
        verifier_cache=verifier_cache.with_lengths(seq_lengths - 1),
        seq_lengths=seq_lengths,
        last_two=last_two,
        key=state.key,
        step=state.step + 1,
        drafted=state.drafted + jnp.where(active, gamma, 0),
        accepted=state.accepted + jnp.where(active, num_accepted, 0),
        active_steps=state.active_steps + active.astype(jnp.int32),
    )


def _prefill(models, params, tokens, lengths, caches, rule, key, budgets, max_new, eos_id):
    draft = nnx.merge(models.draft, params[0])
    verifier = nnx.merge(models.verifier, params[1])
    with jax.named_scope("prefill"):
        logits, verifier_cache, _ = verifier(
            tokens, caches[1], num_tokens=lengths, last_logits_only=True
        )
        _, draft_cache, _ = draft(tokens, caches[0], num_tokens=lengths, last_logits_only=True)
    first = rule.sample(logits[:, 0], jax.random.fold_in(key, 0))
    progress, taken = DecodeProgress.init(budgets, max_new).append(
        first[:, None], jnp.ones_like(lengths), eos_id
    )
    last_prompt_token = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
    zeros = jnp.zeros_like(lengths)
    return SpecState(
        progress=progress,
        draft_cache=draft_cache,
        verifier_cache=verifier_cache,
        seq_lengths=lengths + taken,
        last_two=jnp.stack([last_prompt_token, first], axis=1),
        key=key,
        step=jnp.int32(0),
        drafted=zeros,
        accepted=zeros,
        active_steps=zeros,
    )


_STATIC = ("models", "gamma", "max_new", "eos_id")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("caches",))
def _generate(models, params, tokens, lengths, caches, rule, key, budgets, max_new, eos_id, gamma):
    state = _prefill(models, params, tokens, lengths, caches, rule, key, budgets, max_new, eos_id)
    step = functools.partial(spec_step, models, params, rule, eos_id, gamma)
    return run_to_completion(step, state, max_steps=max_new)


_jit_prefill = jax.jit(
    _prefill, static_argnames=("models", "max_new", "eos_id"), donate_argnames=("caches",)
)
_jit_step = jax.jit(
    spec_step, static_argnames=("models", "eos_id", "gamma"), donate_argnames=("state",)
)


def check_compatible(draft: Llama, verifier: Llama, draft_tokenizer=None, verifier_tokenizer=None):
    """Raises `IncompatibleModelsError` unless draft and verifier share a vocabulary."""
    if draft.config.vocab_size != verifier.config.vocab_size:
        raise IncompatibleModelsError(
            f"the draft's vocabulary has {draft.config.vocab_size} tokens and the verifier's "
            f"{verifier.config.vocab_size}: speculative decoding needs one shared tokenizer"
        )
    if draft_tokenizer is not None and verifier_tokenizer is not None:
        if draft_tokenizer.get_vocab() != verifier_tokenizer.get_vocab():
            raise IncompatibleModelsError(
                "the draft and verifier tokenizers map tokens to different ids: "
                "speculative decoding needs one shared tokenizer"
            )


def _setup(draft, verifier, prompts, config, max_new_tokens, cache_size, key, eos_id, sampler):
    check_compatible(draft, verifier)
    tokens, lengths = pad_prompts(prompts)
    cache_size = cache_size or tokens.shape[1] + max_new_tokens + config.gamma + 1
    check_fits_cache(lengths, max_new_tokens, cache_size, lookahead=config.gamma + 1)
    draft_graphdef, draft_params = nnx.split(draft)
    verifier_graphdef, verifier_params = nnx.split(verifier)
    batch = len(prompts)
    args = (
        (draft_params, verifier_params),
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        (draft.init_cache(batch, cache_size), verifier.init_cache(batch, cache_size)),
        acceptance_for(sampler or Greedy()),
        jax.random.key(0) if key is None else key,
        jnp.full((batch,), max_new_tokens, jnp.int32),
    )
    eos_id = verifier.config.eos_token_id if eos_id == "config" else eos_id
    return _Models(draft_graphdef, verifier_graphdef), args, eos_id


def generate(
    draft: Llama | None,
    verifier: Llama,
    prompts: Sequence[Sequence[int]],
    config: SpecConfig | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    sampler: Sampler | None = None,
    eos_id: int | None | str = "config",
    cache_size: int | None = None,
) -> GenerationResult:
    """Speculative decoding of a batch of prompts, entirely on device.

    Prefills both models, then runs `spec_step` in a `lax.while_loop` until every sequence
    produced EOS or `max_new_tokens`. With `draft=None` it decodes autoregressively with the
    verifier alone (the same interface, for baselines).

    Args:
      draft: the draft model (sharing the verifier's vocabulary), or None.
      verifier: the target model.
      prompts: B token-id lists, ragged lengths allowed.
      config: `SpecConfig` (gamma).
      max_new_tokens: budget per sequence.
      key: PRNG key (sampling only); default `jax.random.key(0)`.
      sampler: `Greedy()` (default) or `Sampling(temperature=, top_k=, top_p=)`.
      eos_id: stop token; "config" takes the verifier config's, None never stops early.
      cache_size: KV positions per sequence (default: padded prompt + budget + gamma + 1).

    Returns:
      `GenerationResult`: tokens per prompt, and stats (steps, tokens, drafted, accepted,
      acceptance_rate, tokens_per_step).
    """
    if draft is None:
        return autoregressive.generate_autoregressive(
            verifier,
            prompts,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            key=key,
            eos_id=eos_id,
            cache_size=cache_size,
        )
    config = config or SpecConfig()
    models, args, eos_id = _setup(
        draft, verifier, prompts, config, max_new_tokens, cache_size, key, eos_id, sampler
    )
    state = _generate(models, *args, max_new_tokens, eos_id, config.gamma)
    return GenerationResult.from_progress(state.progress, spec_stats(state))


def generate_stream(
    draft: Llama | None,
    verifier: Llama,
    prompts: Sequence[Sequence[int]],
    config: SpecConfig | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    sampler: Sampler | None = None,
    eos_id: int | None | str = "config",
    cache_size: int | None = None,
) -> Iterator[tuple[list[list[int]], dict]]:
    """Like `generate`, driven from the host: yields (tokens accepted per sequence, running
    stats) after the prefill and after every step, for streaming output."""
    if draft is None:
        yield from autoregressive.stream_autoregressive(
            verifier,
            prompts,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            key=key,
            eos_id=eos_id,
            cache_size=cache_size,
        )
        return
    config = config or SpecConfig()
    models, args, eos_id = _setup(
        draft, verifier, prompts, config, max_new_tokens, cache_size, key, eos_id, sampler
    )
    state = _jit_prefill(models, *args, max_new_tokens, eos_id)
    step = functools.partial(_jit_step, models, args[0], args[4], eos_id, config.gamma)
    for new_tokens, stepped in stream(step, state, max_steps=max_new_tokens):
        yield new_tokens, spec_stats(stepped)


def spec_stats(state: SpecState) -> dict:
    """Statistics of a run: steps, tokens, drafted/accepted, acceptance rate, tokens/step."""
    tokens = int(np.sum(np.asarray(state.progress.num_generated)))
    drafted = int(np.sum(np.asarray(state.drafted)))
    accepted = int(np.sum(np.asarray(state.accepted)))
    active_steps = int(np.sum(np.asarray(state.active_steps)))
    return {
        "steps": int(state.step),
        "tokens": tokens,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_step": (tokens - len(state.seq_lengths)) / active_steps
        if active_steps
        else 0.0,
    }

"""Plain autoregressive decoding: one verifier forward per token. The baseline every
speculative benchmark compares against, with the same interface as `speculative.generate`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from specattn_jax import sharding
from specattn_jax.cache import KVCache
from specattn_jax.decoding import (
    DecodeProgress,
    GenerationResult,
    check_fits_cache,
    pad_prompts,
    run_to_completion,
    stream,
)
from specattn_jax.model import Llama
from specattn_jax.sampling import Greedy, Sampler


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AutoregressiveState:
    """Attributes:
    progress: generated tokens.
    cache: the model's KV cache.
    last_token: i32[B] the most recent token of each sequence (the next input).
    key: PRNG key; step `i` samples with `fold_in(key, i)`.
    step: i32[] steps taken (the prefill counts as one).
    """

    progress: DecodeProgress
    cache: KVCache
    last_token: jax.Array  # i32[B]
    key: jax.Array
    step: jax.Array  # i32[]


def _prefill(graphdef, params, tokens, lengths, cache, sampler, key, budgets, max_new, eos_id):
    model = nnx.merge(graphdef, params)
    logits, cache, _ = model(tokens, cache, num_tokens=lengths, last_logits_only=True)
    first = sampler.get_next_tokens(logits[:, 0], jax.random.fold_in(key, 0))
    progress, _ = DecodeProgress.init(budgets, max_new).append(
        first[:, None], jnp.ones_like(lengths), eos_id
    )
    return AutoregressiveState(progress, cache, first, key, jnp.int32(1))


def _step(graphdef, params, sampler, eos_id, state: AutoregressiveState) -> AutoregressiveState:
    model = nnx.merge(graphdef, params)
    active = ~state.progress.done
    logits, cache, _ = model(
        state.last_token[:, None], state.cache, num_tokens=active.astype(jnp.int32)
    )
    token = sampler.get_next_tokens(logits[:, 0], jax.random.fold_in(state.key, state.step))
    progress, _ = state.progress.append(token[:, None], jnp.ones_like(token), eos_id)
    last = jnp.where(active, token, state.last_token)
    return AutoregressiveState(progress, cache, last, state.key, state.step + 1)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new", "eos_id"), donate_argnames=("cache",)
)
def _generate(graphdef, params, tokens, lengths, cache, sampler, key, budgets, max_new, eos_id):
    state = _prefill(
        graphdef, params, tokens, lengths, cache, sampler, key, budgets, max_new, eos_id
    )
    step = functools.partial(_step, graphdef, params, sampler, eos_id)
    return run_to_completion(step, state, max_steps=max_new)


_jit_prefill = jax.jit(
    _prefill, static_argnames=("graphdef", "max_new", "eos_id"), donate_argnames=("cache",)
)
_jit_step = jax.jit(_step, static_argnames=("graphdef", "eos_id"), donate_argnames=("state",))


def _setup(model, prompts, max_new_tokens, cache_size, key, eos_id, mesh):
    tokens, lengths = pad_prompts(prompts)
    cache_size = cache_size or tokens.shape[1] + max_new_tokens
    check_fits_cache(lengths, max_new_tokens, cache_size)
    if mesh is not None:
        model = sharding.shard_model(model, mesh)
    graphdef, params = nnx.split(model)
    eos_id = model.config.eos_token_id if eos_id == "config" else eos_id
    args = (
        params,
        sharding.put_batch(mesh, tokens),
        sharding.put_batch(mesh, lengths),
        sharding.init_cache(model, len(prompts), cache_size, mesh),
    )
    budgets = jnp.full((len(prompts),), max_new_tokens, jnp.int32)
    key = jax.random.key(0) if key is None else key
    return graphdef, args, budgets, key, eos_id


def generate_autoregressive(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    key: jax.Array | None = None,
    eos_id: int | None | str = "config",
    cache_size: int | None = None,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Decodes each prompt token by token, all on device in one jitted `while_loop`.

    Args:
      model: the model.
      prompts: B token-id lists (ragged lengths allowed).
      max_new_tokens: budget per sequence.
      sampler: `Greedy()` (the default) or `Sampling(...)`.
      key: PRNG key (sampling only); default `jax.random.key(0)`.
      eos_id: stop token; "config" takes the model config's, None never stops early.
      cache_size: KV positions per sequence (default: padded prompt + max_new_tokens).
      mesh: a ("data", "model") `Mesh`: the model runs tensor-parallel over "model", the
        batch split over "data" (see `specattn_jax.sharding`); None: the default device.

    Returns:
      `GenerationResult` with the tokens and `stats` (steps, tokens, tokens_per_step).
    """
    graphdef, args, budgets, key, eos_id = _setup(
        model, prompts, max_new_tokens, cache_size, key, eos_id, mesh
    )
    sampler = sampler or Greedy()
    state = _generate(graphdef, *args, sampler, key, budgets, max_new_tokens, eos_id)
    return GenerationResult.from_progress(state.progress, _stats(state))


def stream_autoregressive(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    key: jax.Array | None = None,
    eos_id: int | None | str = "config",
    cache_size: int | None = None,
    mesh: Mesh | None = None,
) -> Iterator[tuple[list[list[int]], dict]]:
    """Like `generate_autoregressive`, but driven from the host: yields (new tokens per
    sequence, running stats) after every step."""
    graphdef, args, budgets, key, eos_id = _setup(
        model, prompts, max_new_tokens, cache_size, key, eos_id, mesh
    )
    sampler = sampler or Greedy()
    state = _jit_prefill(graphdef, *args, sampler, key, budgets, max_new_tokens, eos_id)
    step = functools.partial(_jit_step, graphdef, args[0], sampler, eos_id)
    for new_tokens, stepped in stream(step, state, max_steps=max_new_tokens):
        yield new_tokens, _stats(stepped)


def _stats(state: AutoregressiveState) -> dict:
    tokens = int(np.sum(np.asarray(state.progress.num_generated)))
    steps = int(state.step)
    return {"steps": steps, "tokens": tokens, "tokens_per_step": 1.0}

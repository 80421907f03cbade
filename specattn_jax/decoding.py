"""The decoding loop's parts: prompt padding and checks, the output buffer, the on-device
loop, the host-driven streaming loop, and the result type.

The one decoder (`speculative.spec_step`: speculative with a draft, autoregressive without)
provides `prefill(...) -> state` and `step(state) -> state`, where `state.progress` is a
`DecodeProgress`. `run_to_completion` steps it in one `lax.while_loop` on device; `stream`
steps it from the host and yields the tokens each step accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import scatter_rows
from specattn_jax.errors import SpecAttnError

PAD_TOKEN = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeProgress:
    """Generated tokens so far.

    Attributes:
      output: i32[B, N_max] generated tokens (prompt excluded), PAD_TOKEN after the end.
      num_generated: i32[B] tokens written per sequence.
      budgets: i32[B] most tokens each sequence may generate.
      done: bool[B] the sequence produced EOS or reached its budget.
    """

    output: jax.Array  # i32[B, N_max]
    num_generated: jax.Array  # i32[B]
    budgets: jax.Array  # i32[B]
    done: jax.Array  # bool[B]

    @classmethod
    def init(cls, budgets: jax.Array, max_new_tokens: int) -> DecodeProgress:
        batch = budgets.shape[0]
        return cls(
            output=jnp.full((batch, max_new_tokens), PAD_TOKEN, jnp.int32),
            num_generated=jnp.zeros((batch,), jnp.int32),
            budgets=budgets,
            done=budgets <= 0,
        )

    def append(
        self,
        tokens: jax.Array,  # i32[B, K]
        counts: jax.Array,  # i32[B]
        stop_sequences: tuple[tuple[int, ...], ...],
    ) -> tuple[DecodeProgress, jax.Array]:
        """Appends each row's first `counts[b]` tokens, cut after the first completed stop
        sequence (an EOS id is one of length 1; longer ones may begin in earlier steps' tokens)
        and at the budget.

        Rows already done append nothing. Returns the new progress and i32[B], the number of
        tokens actually appended per row.
        """
        num_new = tokens.shape[1]
        offsets = jnp.arange(num_new, dtype=jnp.int32)
        take = jnp.where(self.done, 0, counts)
        first_stop = self._first_stop(tokens, stop_sequences)  # i32[B], num_new if none
        take = jnp.where(first_stop < take, first_stop + 1, take)
        take = jnp.minimum(take, self.budgets - self.num_generated)
        positions = self.num_generated[:, None] + offsets[None, :]
        positions = jnp.where(offsets[None, :] < take[:, None], positions, self.output.shape[1])
        output = scatter_rows(self.output, positions, tokens)
        num_generated = self.num_generated + take
        done = self.done | (num_generated >= self.budgets) | (first_stop < take)
        return dataclasses.replace(
            self, output=output, num_generated=num_generated, done=done
        ), take

    def _first_stop(
        self,
        tokens: jax.Array,  # i32[B, K]
        stop_sequences: tuple[tuple[int, ...], ...],
    ) -> jax.Array:  # i32[B]
        """Per row, the first offset into `tokens` at which a stop sequence ends, matched
        over the tokens generated before them and these; K where none does."""
        batch, num_new = tokens.shape
        if not stop_sequences:
            return jnp.full((batch,), num_new, jnp.int32)
        history = max(len(sequence) for sequence in stop_sequences) - 1
        past = jnp.full((batch, history), PAD_TOKEN, jnp.int32)  # before generation: no match
        if history and self.output.shape[1]:
            positions = self.num_generated[:, None] - history + jnp.arange(history)[None, :]
            earlier = jnp.take_along_axis(
                self.output, jnp.clip(positions, 0, self.output.shape[1] - 1), axis=1
            )
            past = jnp.where(positions >= 0, earlier, PAD_TOKEN)
        window = jnp.concatenate([past, tokens], axis=1)  # i32[B, history + K]
        ends = jnp.zeros((batch, num_new), bool)
        for sequence in stop_sequences:
            match = jnp.ones((batch, num_new), bool)
            for i, token in enumerate(sequence):  # token i sits len - 1 - i before the end
                start = history - (len(sequence) - 1) + i
                match &= window[:, start : start + num_new] == token
            ends |= match
        return jnp.where(ends.any(axis=1), jnp.argmax(ends, axis=1), num_new).astype(jnp.int32)


def pad_prompts(
    prompts: Sequence[Sequence[int]], bucket: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists to one length, rounded up to a power of two (at least `bucket`)
    so that prompts of nearby lengths share one compiled prefill.

    Returns (tokens i32[B, T], lengths i32[B]).
    """
    if not prompts:
        raise SpecAttnError("no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise SpecAttnError("every prompt needs at least one token (e.g. BOS)")
    width = max(bucket, 1 << int(np.ceil(np.log2(lengths.max()))))
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, lengths


def check_fits_cache(
    prompt_lengths: np.ndarray, max_new_tokens: int, cache_size: int, lookahead: int = 0
) -> None:
    """Raises if a prompt plus its new tokens (plus a verify lookahead) exceeds the cache."""
    if max_new_tokens < 0:
        raise SpecAttnError(f"max_new_tokens={max_new_tokens} must be >= 0")
    longest = int(prompt_lengths.max())
    if longest > cache_size:
        raise SpecAttnError(
            f"the prompt has {longest} tokens, longer than the cache of {cache_size} positions"
        )
    need = longest + max_new_tokens + lookahead
    if need > cache_size:
        raise SpecAttnError(
            f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens}"
            + (f" + {lookahead} lookahead positions" if lookahead else "")
            + f" = {need} positions overflows the cache of {cache_size}"
        )


def run_to_completion(step: Callable, state, max_steps: int):
    """Steps `state` in one `lax.while_loop` until every sequence is done (or `max_steps`)."""

    def cond(carry):
        steps, state = carry
        return (steps < max_steps) & ~jnp.all(state.progress.done)

    def body(carry):
        steps, state = carry
        return steps + 1, step(state)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def stream(step: Callable, state, max_steps: int) -> Iterator[tuple[list[list[int]], object]]:
    """Host-driven loop: yields (new tokens per sequence, state) for the given state (the
    prefill's tokens, if any) and after each step."""
    seen = np.asarray(state.progress.num_generated)
    output = np.asarray(state.progress.output)
    yield [output[b, :n].tolist() for b, n in enumerate(seen)], state
    for _ in range(max_steps):
        if bool(np.all(np.asarray(state.progress.done))):
            return
        state = step(state)
        output = np.asarray(state.progress.output)
        counts = np.asarray(state.progress.num_generated)
        yield [output[b, seen[b] : counts[b]].tolist() for b in range(len(counts))], state
        seen = counts


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated tokens and statistics.

    Attributes:
      tokens: one list of generated ids per prompt (prompt excluded, EOS included if hit).
      stats: numbers describing the run (steps, acceptance, KV reduction, ...).
    """

    tokens: list[list[int]]
    stats: dict

    @classmethod
    def from_progress(cls, progress: DecodeProgress, stats: dict) -> GenerationResult:
        output = np.asarray(progress.output)
        counts = np.asarray(progress.num_generated)
        return cls(tokens=[output[b, :n].tolist() for b, n in enumerate(counts)], stats=stats)

"""Plain autoregressive decoding: one verifier forward per token, the baseline every
speculative benchmark compares against. It is the speculative decoder's own loop with no
draft (`speculative.generate(None, model, ...)`), under the names of earlier releases.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh

from specattn_jax.decoding import GenerationResult
from specattn_jax.model import Llama
from specattn_jax.sampling import Sampler
from specattn_jax.speculative import generate, generate_stream


def generate_autoregressive(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    key: jax.Array | None = None,
    eos_id: int | Sequence[int] | None | str = "config",
    cache_size: int | None = None,
    mesh: Mesh | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """`generate(None, model, prompts, ...)`: decodes each prompt token by token, all on
    device in one jitted `while_loop`. Stats as `generate`'s (no drafts, every layer dense)."""
    return generate(
        None, model, prompts, max_new_tokens=max_new_tokens, sampler=sampler, key=key,
        eos_id=eos_id, cache_size=cache_size, mesh=mesh, prefill_chunk=prefill_chunk,
    )  # fmt: skip


def stream_autoregressive(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    key: jax.Array | None = None,
    eos_id: int | Sequence[int] | None | str = "config",
    cache_size: int | None = None,
    mesh: Mesh | None = None,
    prefill_chunk: int | None = None,
) -> Iterator[tuple[list[list[int]], dict]]:
    """`generate_stream(None, model, prompts, ...)`: yields (new tokens per sequence, running
    stats) after every step."""
    return generate_stream(
        None, model, prompts, max_new_tokens=max_new_tokens, sampler=sampler, key=key,
        eos_id=eos_id, cache_size=cache_size, mesh=mesh, prefill_chunk=prefill_chunk,
    )  # fmt: skip

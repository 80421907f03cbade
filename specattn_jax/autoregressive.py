"""Plain autoregressive decoding: one verifier forward per token, the baseline every
speculative benchmark compares against. It is the speculative decoder's own loop with no
draft (`speculative.generate(None, model, ...)`), under the names of earlier releases.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from specattn_jax.decoding import GenerationResult
from specattn_jax.model import Llama
from specattn_jax.speculative import generate, generate_stream


def generate_autoregressive(
    model: Llama, prompts: Sequence[Sequence[int]], **options
) -> GenerationResult:
    """`generate(None, model, prompts, **options)`: decodes each prompt token by token, all on
    device in one jitted `while_loop`, with `generate`'s keyword options (`max_new_tokens`,
    `sampler`, `key`, `eos_id`, `stop_strings`, ...). Stats as `generate`'s (no drafts, every
    layer dense)."""
    return generate(None, model, prompts, **options)


def stream_autoregressive(
    model: Llama, prompts: Sequence[Sequence[int]], **options
) -> Iterator[tuple[list[list[int]], dict]]:
    """`generate_stream(None, model, prompts, **options)`: yields (new tokens per sequence,
    running stats) after the prefill and after every step."""
    return generate_stream(None, model, prompts, **options)

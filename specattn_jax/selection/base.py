"""The selector interface: one small dataclass per method, one `plan` method each.

Every method (SpecAttn and the baselines) turns what it may legitimately see at decode time
into an `AttentionPlan` for the verifier's forward: per verifier layer, a compacted block
list (or a `query_selector` that computes one inside the layer from that layer's queries).
One sparse attention kernel then reads exactly those blocks, so every method is measured on
the same path.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax

from specattn_jax.attention import AttentionPlan


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectionInputs:
    """What a selector may look at before a verify forward.

    Attributes:
      context_lengths: i32[B] cache positions before the new tokens (the candidates).
      draft_attention: f32[A, U, B, S] the head-mean attention of the A drafting queries over
        the cache positions, in the U draft layers of the selector's `draft_layers`, or None
        when it names none.
      num_layers: verifier layers (static).
      cache_size: S, positions per sequence (static).
      verifier_attention: f32[V, B, S] the verifier's previous verify forward: its queries'
        mean head-mean attention over the cache positions (zero where that forward did not
        read; all zero before the first verify), in the V verifier layers of the selector's
        `verifier_layers`, or None when it names none.
    """

    context_lengths: jax.Array  # i32[B]
    draft_attention: jax.Array | None  # f32[A, U, B, S]
    num_layers: int = dataclasses.field(metadata=dict(static=True))
    cache_size: int = dataclasses.field(metadata=dict(static=True))
    verifier_attention: jax.Array | None = None  # f32[V, B, S]


class Selector(Protocol):
    """A KV selection method."""

    granularity: int
    # The draft layers whose attention the selector reads, ascending (empty: none). Only
    # these draft layers compute their attention summaries.
    draft_layers: tuple[int, ...]
    # The verifier layers whose attention of the previous verify forward the selector reads,
    # ascending (empty: none). Only these verifier layers compute their summaries.
    verifier_layers: tuple[int, ...]

    def plan(self, inputs: SelectionInputs) -> AttentionPlan | None:
        """The verifier's attention plan for one forward (None: dense everywhere)."""
        ...


def sparse_layer_flags(num_layers: int, dense_layers: int) -> tuple[bool, ...]:
    """Per verifier layer, whether it reads sparsely: all but the first `dense_layers`."""
    return tuple(layer >= dense_layers for layer in range(num_layers))

"""Block lists: the compacted, padded KV index lists every selector produces.

A selection at `granularity` g is, per row, the ascending ids of the selected blocks (block
i covers positions [i * g, (i + 1) * g)) compacted to the front of an i32[N] array, padded
with `pallas_kernels.FILL_INDEX` (0: always in bounds, never read past the count), and the
count. `compact_blocks` is the kernels' own (one home for the list format).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import compact_blocks, scatter_rows

__all__ = [
    "add_forced_blocks",
    "blocks_to_mask",
    "compact_blocks",
    "forced_blocks",
    "num_blocks",
    "positions_to_block_mask",
]


def num_blocks(cache_size: int, granularity: int) -> int:
    """Blocks covering `cache_size` positions."""
    return -(-cache_size // granularity)


def blocks_to_mask(block_indices: jax.Array, block_counts: jax.Array, num: int) -> jax.Array:
    """bool[..., num]: which blocks a (indices i32[..., N], counts i32[...]) list selects."""
    valid = jnp.arange(block_indices.shape[-1]) < block_counts[..., None]
    flat_indices = jnp.where(valid, block_indices, num).reshape(-1, block_indices.shape[-1])
    mask = scatter_rows(
        jnp.zeros((flat_indices.shape[0], num), bool),
        flat_indices,
        jnp.ones(flat_indices.shape, bool),
    )
    return mask.reshape(*block_indices.shape[:-1], num)


def positions_to_block_mask(position_mask: jax.Array, granularity: int) -> jax.Array:
    """bool[..., S / g]: a block is selected if any of its positions is (S divisible by g)."""
    *lead, size = position_mask.shape
    return position_mask.reshape(*lead, size // granularity, granularity).any(axis=-1)


def add_forced_blocks(
    block_indices: jax.Array,  # i32[..., N]
    block_counts: jax.Array,  # i32[...]
    forced: jax.Array,  # bool[..., N]
) -> tuple[jax.Array, jax.Array]:
    """The union of a block list with the `forced` blocks (sinks, recent windows)."""
    mask = blocks_to_mask(block_indices, block_counts, block_indices.shape[-1]) | forced
    return compact_blocks(mask)


def forced_blocks(
    context_lengths: jax.Array,  # i32[B]
    num: int,
    granularity: int,
    *,
    sinks: int = 0,
    recent: int = 0,
) -> jax.Array:
    """bool[B, num]: the blocks holding the first `sinks` and the last `recent` context
    positions of each row."""
    starts = jnp.arange(num)[None, :] * granularity
    ends = starts + granularity
    context = context_lengths[:, None]
    is_sink = starts < jnp.minimum(sinks, context)
    is_recent = (ends > context - recent) & (starts < context)
    return is_sink | (is_recent if recent else False)

"""A step's new keys and values into the KV cache: one kernel writes both, in place.

A decode or verify step appends T <= 16 tokens to each sequence at positions
`starts[b] + t`. XLA writes each of the two caches with a dynamic-update-slice and, to keep a
scatter's drop-out-of-bounds rule, reads the slice back and selects: about four small kernels
per layer. `write_new_rows` is one launch, its outputs aliased to the caches (so under `jit`
with the cache donated, or carried by a loop, nothing is copied), rows past the cache dropped
as the scatter drops them. Its reference is `scatter_rows`.

Shapes: `B` batch, `T` new tokens, `S` cache positions, `H_kv` KV heads, `D` head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import is_block_dim, next_power_of_2

# Most new tokens per write (a step's; prefill writes through XLA's scatter).
MAX_NEW = 16


def supports(num_new: int, seq_len: int, head_dim: int) -> bool:
    """Whether the kernel writes this shape: 1..MAX_NEW new rows (their power-of-two lane
    count fitting the cache) of a head dim that is a power of two >= 16."""
    return 0 < num_new <= MAX_NEW and next_power_of_2(num_new) <= seq_len and is_block_dim(head_dim)


def _wrap(x: jax.Array, n: int) -> jax.Array:
    """x mod n in [0, n), whatever the sign of x."""
    r = jax.lax.rem(x, n)
    return jnp.where(r < 0, r + n, r)


def _kernel(
    start_ref,  # [1] this row's first new position
    k_new_ref,  # [T, D] new keys of one (row, KV head)
    v_new_ref,  # [T, D] new values
    k_cache_ref,  # [S, D] (aliased to k_out_ref, never read)
    v_cache_ref,  # [S, D] (aliased to v_out_ref, never read)
    k_out_ref,  # [S, D] the keys, new rows written
    v_out_ref,  # [S, D] the values, new rows written
):
    del k_cache_ref, v_cache_ref
    num_new, head_dim = k_new_ref.shape
    seq_len = k_out_ref.shape[0]
    lanes = jnp.arange(next_power_of_2(num_new), dtype=jnp.int32)
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    positions = start_ref[0] + lanes
    keep = (lanes < num_new) & (positions >= 0) & (positions < seq_len)
    # Lanes not stored still name distinct rows (interpret mode stores every lane).
    rows = _wrap(positions, seq_len)
    sources = jnp.minimum(lanes, num_new - 1)
    for new_ref, out_ref in ((k_new_ref, k_out_ref), (v_new_ref, v_out_ref)):
        values = pltriton.load(new_ref.at[sources[:, None], dims[None, :]])
        pltriton.store(
            out_ref.at[rows[:, None], dims[None, :]],
            values.astype(out_ref.dtype),
            mask=keep[:, None],
        )


@functools.partial(jax.jit, static_argnames=("interpret", "debug"))
def write_new_rows(
    k_cache: jax.Array,  # [B, S, H_kv, D]
    v_cache: jax.Array,  # [B, S, H_kv, D]
    starts: jax.Array,  # i32[B]
    k_new: jax.Array,  # [B, T, H_kv, D]
    v_new: jax.Array,  # [B, T, H_kv, D]
    *,
    interpret: bool = False,
    debug: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The caches with token t of row b written at position `starts[b] + t` (positions past
    the cache dropped), the same as `scatter_rows` with those positions.

    Returns (k_cache, v_cache): the input buffers, written in place where XLA may reuse them
    (donated, or a loop's carry), else copies.
    """
    if k_cache.shape != v_cache.shape or k_new.shape != v_new.shape:
        raise ValueError(
            f"k_cache {k_cache.shape} and v_cache {v_cache.shape}, k_new {k_new.shape} and "
            f"v_new {v_new.shape} must match."
        )
    batch, seq_len, num_kv_heads, head_dim = k_cache.shape
    if k_new.ndim != 4 or k_new.shape[0] != batch or k_new.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"k_new {k_new.shape} must be [B, T, H_kv, D] of k_cache {k_cache.shape}.")
    if starts.shape != (batch,):
        raise ValueError(f"starts must be i32[B={batch}], got shape {starts.shape}.")
    num_new = k_new.shape[1]
    if not supports(num_new, seq_len, head_dim):
        raise ValueError(
            f"{num_new} new rows of head dim {head_dim} into a cache of {seq_len}: the kernel "
            f"takes 1 to {MAX_NEW} rows (lanes fitting the cache) and head dims that are "
            "powers of two >= 16."
        )
    new_spec = pl.BlockSpec((None, num_new, None, head_dim), lambda b, h: (b, 0, h, 0))
    cache_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h: (b, 0, h, 0))
    return pl.pallas_call(
        _kernel,
        grid=(batch, num_kv_heads),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h: (b,)),  # starts
            new_spec,
            new_spec,
            cache_spec,
            cache_spec,
        ],
        out_specs=[cache_spec, cache_spec],
        out_shape=[jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        debug=debug,
        name="write_new_rows",
    )(starts.astype(jnp.int32), k_new, v_new, k_cache, v_cache)

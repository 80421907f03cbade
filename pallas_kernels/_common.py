"""Constants and small helpers shared by the kernels in this package.

Nothing here imports the library (`specattn_jax`): the dependency runs the other way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Finite mask value for attention logits: exp() of it underflows to 0 and max() with it never
# produces NaN, unlike -inf. Shared by kernels and references.
DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

BACKENDS = ("auto", "pallas", "reference")

# Block sizes (tokens per KV block) the selection and the sparse verify kernel support.
GRANULARITIES = (1, 16, 32, 64)

# Value of a block list after its count: block 0, always in bounds, never read.
FILL_INDEX = 0


@functools.cache
def default_backend() -> str:
    """'pallas' when the default JAX device is a CUDA GPU, else 'reference'.

    The Pallas kernels use the Triton lowering, which runs on NVIDIA GPUs (Ampere, Ada, Hopper).
    Everywhere else (CPU, TPU, ROCm) the plain `jnp` references run instead; they compute the
    same function (bit-exact for the top-p selection, within dtype tolerance for attention).
    """
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return "reference"
    if device.platform != "gpu":
        return "reference"
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "reference" if "rocm" in version else "pallas"


def resolve_backend(backend: str) -> str:
    """Maps `backend` ("auto", "pallas" or "reference") to "pallas" or "reference"."""
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS}.")
    return default_backend() if backend == "auto" else backend


def scatter_rows(target: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
    """`target[r, index[r, k]] = values[r, k]` for every row r, indices past a row dropped.

    target: [R, N, ...]; index: i32[R, K]; values: [R, K, ...] (target's trailing shape).
    One scatter batched over rows (`vmap`), so XLA writes a target split over its rows on
    each device in place; a scatter through explicit row indices would be gathered first.
    """

    def write_row(row, row_index, row_values):
        return row.at[row_index].set(row_values.astype(row.dtype), mode="drop")

    return jax.vmap(write_row)(target, index, values)


def is_block_dim(n: int) -> bool:
    """Whether n can be a tile dimension of these kernels: a power of two >= 16 (Triton's
    `arange` and `dot` shapes)."""
    return n >= 16 and not n & (n - 1)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cdiv_dynamic(a, b):
    """Ceiling division of traced integers (`cdiv` for Python ints)."""
    return (a + (b - 1)) // b


def check_granularity(granularity: int) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"{granularity=} must be one of {GRANULARITIES}.")


def compact_blocks(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(i32[..., N] ascending ids of the True entries compacted to the front, then
    FILL_INDEX; i32[...] counts) from bool[..., N], by a prefix sum (no sort)."""
    num = mask.shape[-1]
    counts = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    slots = jnp.where(mask, jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, num)
    ids = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), mask.shape)
    flat_slots, flat_ids = slots.reshape(-1, num), ids.reshape(-1, num)
    fill = jnp.full(flat_slots.shape, FILL_INDEX, jnp.int32)
    return scatter_rows(fill, flat_slots, flat_ids).reshape(mask.shape), counts


def log2_exact(n: int) -> int:
    """log2 of a power of two, raising ValueError otherwise."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{n=} must be a power of two.")
    return int(math.log2(n))

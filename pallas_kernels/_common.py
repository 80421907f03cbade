"""Constants and small helpers shared by the kernels in this package.

Nothing here imports the library (`specattn_jax`): the dependency runs the other way.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

# Finite mask value for attention logits: exp() of it underflows to 0 and max() with it never
# produces NaN, unlike -inf. Shared by kernels and references.
DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

BACKENDS = ("auto", "pallas", "reference")


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


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def log2_exact(n: int) -> int:
    """log2 of a power of two, raising ValueError otherwise."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{n=} must be a power of two.")
    return int(math.log2(n))

"""The KV cache: preallocated, static-shape keys and values for every layer, plus the number
of valid positions of each sequence.

Each layer's keys and values are their own buffer (a tuple over layers rather than one
[L, ...] array), so a jitted step with the cache donated updates every layer in place and
the attention kernels read a layer's buffer directly, with no slice or stack copies.

`LayerCache.write` is the one place new keys and values enter a cache.

Rolling back rejected draft tokens is setting `lengths`: entries at or past a sequence's
length are stale and never read (every forward writes its new tokens before it attends, and a
query at position p reads only positions <= p).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import scatter_rows
from pallas_kernels.cache_write import write_new_rows
from specattn_jax.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's keys and values.

    Attributes:
      k: [B, S, H_kv, D] keys, RoPE already applied.
      v: [B, S, H_kv, D] values.
    """

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def write(
        self,
        positions: jax.Array,  # i32[B, T]
        k: jax.Array,  # [B, T, H_kv, D]
        v: jax.Array,  # [B, T, H_kv, D]
        *,
        kernel: bool = False,
    ) -> LayerCache:
        """The cache with token t of row b written at `positions[b, t]` (positions past the
        cache dropped). Batched over rows, so a cache split over devices by row or head is
        written in place, with no gather.

        kernel: each row's positions are consecutive (a model step): write keys and values
        in one launch of `pallas_kernels.cache_write` (a CUDA GPU; no mesh, which XLA
        cannot partition a Pallas call over) instead of XLA's two scatters.
        """
        if kernel:
            return LayerCache(*write_new_rows(self.k, self.v, positions[:, 0], k, v))
        return LayerCache(scatter_rows(self.k, positions, k), scatter_rows(self.v, positions, v))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of all layers.

    Attributes:
      k: L arrays [B, S_max, H_kv, D]: keys, RoPE already applied.
      v: L arrays [B, S_max, H_kv, D]: values.
      lengths: i32[B] valid positions per sequence (the next token goes at `lengths[b]`).
    """

    k: tuple[jax.Array, ...]  # L x [B, S_max, H_kv, D]
    v: tuple[jax.Array, ...]  # L x [B, S_max, H_kv, D]
    lengths: jax.Array  # i32[B]

    @classmethod
    def init(
        cls, config: LlamaConfig, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.float32
    ) -> KVCache:
        """An empty cache of `max_len` positions per sequence."""
        if max_len < 1:
            raise ValueError(f"cache size max_len={max_len} must be at least 1")
        shape = (batch_size, max_len, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in layers),
            v=tuple(jnp.zeros(shape, dtype) for _ in layers),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self.k[index], self.v[index])

    @classmethod
    def from_layers(cls, layers: list[LayerCache], lengths: jax.Array) -> KVCache:
        """A cache of these layers' buffers with valid lengths i32[B]."""
        return cls(
            k=tuple(layer.k for layer in layers),
            v=tuple(layer.v for layer in layers),
            lengths=lengths.astype(jnp.int32),
        )

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        """The same entries with new valid lengths (i32[B]): a rollback or an advance."""
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

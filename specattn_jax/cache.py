"""The KV cache: preallocated, static-shape keys and values for every layer, plus the number
of valid positions of each sequence.

Each layer's keys and values are their own buffer (a tuple over layers rather than one
[L, ...] array), so a jitted step with the cache donated updates every layer in place and
the attention kernels read a layer's buffer directly, with no slice or stack copies.

Rolling back rejected draft tokens is setting `lengths`: entries at or past a sequence's
length are stale and never read (every forward writes its new tokens before it attends, and a
query at position p reads only positions <= p).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specattn_jax.config import LlamaConfig


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

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        """The same entries with new valid lengths (i32[B]): a rollback or an advance."""
        return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

"""Attention over the KV cache: dense (prefill, decode, dense verify) and sparse (verify that
reads only the KV blocks an `AttentionPlan` selects).

Every attention function returns, besides its output, what it read: i32[B] cache positions
per sequence whose keys and values it consumed, counted by the function that read them (the
Pallas kernel from its load masks, the jnp paths from their attention masks). The KV-read
statistics are sums of these counts, never recomputed from the selection.

Shapes: `B` batch, `T` new query tokens, `S` cache positions, `H` query heads, `H_kv` KV
heads, `G = H // H_kv`, `D` head dim, `N` selected blocks, `L` layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels._common import DEFAULT_MASK_VALUE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Which KV entries each verifier layer reads during one forward.

    Layers with `sparse_layers[l] == False` attend densely. A sparse layer reads, for each
    sequence, the context blocks `block_indices[l, b, :block_counts[l, b]]` (block `i` covers
    positions `[i * granularity, (i + 1) * granularity)`, clipped to the context), plus the new
    tokens of this forward, causally. A selector that needs the layer's own queries (Quest,
    Double Sparsity, the oracle) leaves the lists None and sets `query_selector`, whose
    `select(layer, q, k_cache, context_lengths) -> (block_indices i32[B, N], counts i32[B])`
    runs inside the layer.

    Attributes:
      block_indices: i32[L, B, N] selected block ids, ascending, compacted to the front.
      block_counts: i32[L, B] number of valid ids per row.
      granularity: tokens per block (static).
      sparse_layers: per verifier layer, whether it reads sparsely (static).
      query_selector: a pytree with a `select` method, or None.
    """

    block_indices: jax.Array | None  # i32[L, B, N]
    block_counts: jax.Array | None  # i32[L, B]
    granularity: int = dataclasses.field(metadata=dict(static=True), default=1)
    sparse_layers: tuple[bool, ...] = dataclasses.field(metadata=dict(static=True), default=())
    query_selector: Any = None

    def layer_selection(
        self, layer: int, q: jax.Array, k_cache: jax.Array, context_lengths: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(block_indices i32[B, N], block_counts i32[B]) for one sparse layer."""
        if self.query_selector is not None:
            return self.query_selector.select(layer, q, k_cache, context_lengths)
        return self.block_indices[layer], self.block_counts[layer]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardInfo:
    """What a forward reports besides logits and cache.

    Attributes:
      attention: f32[L, B, T, S] head-mean attention probabilities over cache positions (when
        asked for; sparse layers report zeros), else None.
      kv_read: i32[L, B] cache positions each layer's attention read per sequence, as counted
        by the attention that read them (the selected context, at the granularity read and
        clipped to the context, plus the T new tokens).
      kv_dense: i32[B] positions a dense layer reads: context + T.
      queries: [L, B, T, H, D] every layer's RoPE'd queries (when asked for), else None.
    """

    attention: jax.Array | None
    kv_read: jax.Array  # i32[L, B]
    kv_dense: jax.Array  # i32[B]
    queries: jax.Array | None = None


def _per_sequence(reads: jax.Array) -> jax.Array:
    """i32[B] from the kernels' i32[B, H_kv]: every KV head reads the same positions."""
    return jnp.max(reads, axis=1)


def dense_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    v: jax.Array,  # [B, S, H_kv, D]
    query_positions: jax.Array,  # i32[B, T]
    *,
    return_summary: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Causal attention of new queries over the cache (new keys already written), in XLA.

    Query t of row b reads every cache position s <= query_positions[b, t]. Returns the output
    [B, T, H, D] (q's dtype), the positions read i32[B], and, if asked, the head-mean
    attention probabilities f32[B, T, S] (zero at positions not read).
    """
    batch, num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    key_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
    visible = key_positions[None, None, :] <= query_positions[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, DEFAULT_MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, H_kv, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    summary = probs.mean(axis=(1, 2)) if return_summary else None
    reads = jnp.sum(visible.any(axis=1), axis=-1, dtype=jnp.int32)
    return out.reshape(batch, num_tokens, num_heads, head_dim), reads, summary


def dense_kernel_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    v: jax.Array,  # [B, S, H_kv, D]
    context_lengths: jax.Array,  # i32[B]
) -> tuple[jax.Array, jax.Array]:
    """Dense decode/verify through the Pallas verify kernel (every context block selected):
    (output [B, T, H, D], positions read i32[B])."""
    out, reads = pallas_kernels.dense_verify_attention(q, k, v, context_lengths, return_reads=True)
    return out, _per_sequence(reads)


def sparse_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    v: jax.Array,  # [B, S, H_kv, D]
    block_indices: jax.Array,  # i32[B, N]
    block_counts: jax.Array,  # i32[B]
    context_lengths: jax.Array,  # i32[B]
    *,
    granularity: int,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Verify attention reading only the selected context blocks plus the new tokens.

    The new T tokens sit at positions `context_lengths[b] + t` (already written) and are
    attended causally whatever the selection. Returns the output [B, T, H, D] in q's dtype
    and the positions read i32[B]. `backend` picks the Pallas kernel ("pallas"), the jnp
    reference ("reference"), or the kernel on GPU and the reference elsewhere ("auto").
    """
    out, reads = pallas_kernels.sparse_verify_attention_dispatch(
        q,
        k,
        v,
        block_indices,
        block_counts,
        context_lengths,
        granularity=granularity,
        return_reads=True,
        backend=backend,
    )
    return out, _per_sequence(reads)

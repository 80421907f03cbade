"""Attention over the KV cache: dense (prefill, decode, dense verify) and sparse (verify that
reads only the KV blocks an `AttentionPlan` selects).

Shapes: `B` batch, `T` new query tokens, `S` cache positions, `H` query heads, `H_kv` KV
heads, `G = H // H_kv`, `D` head dim, `N` selected blocks, `L` layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Finite mask value, shared with the kernels: exp() of it underflows to 0 without NaNs.
DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Which KV entries each verifier layer reads during one forward.

    Layers with `sparse_layers[l] == False` attend densely. A sparse layer reads, for each
    sequence, the context blocks `block_indices[l, b, :block_counts[l, b]]` (block `i` covers
    positions `[i * granularity, (i + 1) * granularity)`, clipped to the context), plus the new
    tokens of this forward, causally.

    Attributes:
      block_indices: i32[L, B, N] selected block ids, ascending, compacted to the front.
      block_counts: i32[L, B] number of valid ids per row.
      granularity: tokens per block (static).
      sparse_layers: per verifier layer, whether it reads sparsely (static).
    """

    block_indices: jax.Array  # i32[L, B, N]
    block_counts: jax.Array  # i32[L, B]
    granularity: int = dataclasses.field(metadata=dict(static=True), default=1)
    sparse_layers: tuple[bool, ...] = dataclasses.field(metadata=dict(static=True), default=())


def dense_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    v: jax.Array,  # [B, S, H_kv, D]
    query_positions: jax.Array,  # i32[B, T]
    *,
    return_summary: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Causal attention of new queries over the cache (new keys already written).

    Query t of row b reads every cache position s <= query_positions[b, t]. Returns the output
    [B, T, H, D] (q's dtype) and, if asked, the head-mean attention probabilities
    f32[B, T, S] (zero at positions not read).
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
    return out.reshape(batch, num_tokens, num_heads, head_dim), summary


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
) -> jax.Array:
    """Verify attention reading only the selected context blocks plus the new tokens.

    The new T tokens sit at positions `context_lengths[b] + t` (already written) and are
    attended causally whatever the selection. Returns [B, T, H, D] in q's dtype. `backend`
    picks the Pallas kernel ("pallas"), the jnp reference ("reference"), or the kernel on GPU
    and the reference elsewhere ("auto").
    """
    import pallas_kernels

    return pallas_kernels.sparse_verify_attention_dispatch(
        q,
        k,
        v,
        block_indices,
        block_counts,
        context_lengths,
        granularity=granularity,
        backend=backend,
    )

"""Baseline selectors, each choosing KV entries from what it may legitimately use at decode
time, for the same sparse attention path as SpecAttn:

- `StreamingLLM`: attention sinks plus the most recent window.
- `Quest`: per-page (16 tokens) key min/max bounds scored against the current queries,
  top-k pages.
- `DoubleSparsity`: approximate scores from r offline-calibrated outlier channels of q and k
  (the "label cache"), top-k tokens.
- `OracleTopP`: top-p of the verifier's own attention: an upper bound, not a method (it
  reads every key to decide).

Our kernel reads one block list per (sequence, layer), shared by the heads, so the
per-head methods aggregate over heads and query positions the way SpecAttn does: the mean
over heads and queries of each head's estimated attention distribution. Budgets are
fractions of the context (`budget` in (0, 1]) and are met exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import DEFAULT_MASK_VALUE
from specattn_jax.attention import AttentionPlan
from specattn_jax.selection.base import SelectionInputs, sparse_layer_flags
from specattn_jax.selection.blocks import compact_blocks, positions_to_block_mask

QUEST_PAGE = 16


def _budget_count(budget: jax.Array, available: jax.Array) -> jax.Array:
    """i32[B]: ceil(budget * available), at least 1 where anything is available."""
    count = jnp.ceil(budget * available.astype(jnp.float32)).astype(jnp.int32)
    return jnp.minimum(jnp.maximum(count, 1), available)


def select_top_k(
    scores: jax.Array, valid: jax.Array, k: jax.Array, num_iters: int = 32
) -> tuple[jax.Array, jax.Array]:
    """The k[b] highest-scoring valid entries of each row of f32[B, N], as a block list.

    Exactly min(k, valid count) entries are selected; among scores within the search's
    resolution of the k-th largest, the earlier entries win. Sort-free: a bisection on the
    threshold (a sort here would also change how XLA compiles the surrounding model).
    """
    k = jnp.minimum(k, valid.sum(axis=-1))[:, None]
    scores = jnp.where(valid, scores, -jnp.inf)
    finite = jnp.where(valid, scores, 0.0)
    lo = jnp.min(jnp.where(valid, scores, jnp.inf), axis=-1, keepdims=True)
    hi = jnp.max(finite, axis=-1, keepdims=True) + 1.0  # count(>= hi) = 0 < k

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) * 0.5
        enough = jnp.sum(scores >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, hi = jax.lax.fori_loop(0, num_iters, bisect, (jnp.minimum(lo, hi), hi))
    above = scores >= hi  # fewer than k
    boundary = (scores >= lo) & ~above
    room = k - above.sum(axis=-1, keepdims=True)
    chosen = above | (boundary & (jnp.cumsum(boundary, axis=-1) <= room))
    return compact_blocks(chosen & valid)


def _head_mean_probabilities(scores: jax.Array, context_lengths: jax.Array) -> jax.Array:
    """f32[B, N] mean over (queries, heads) of softmax over N of scores f32[B, T, K, G, N],
    restricted to the valid entries (N < the context in blocks)."""
    valid = jnp.arange(scores.shape[-1])[None, :] < context_lengths[:, None]
    scores = jnp.where(valid[:, None, None, None], scores, DEFAULT_MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1).mean(axis=(1, 2, 3))


def _grouped_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> f32[B, T, H_kv, G, D]."""
    batch, num_new, num_heads, head_dim = q.shape
    return q.astype(jnp.float32).reshape(
        batch, num_new, num_kv_heads, num_heads // num_kv_heads, head_dim
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingLLM:
    """Sinks + recent window: keeps `sinks` first positions and the most recent ones up to
    `budget` of the context."""

    budget: jax.Array
    sinks: int = dataclasses.field(default=4, metadata=dict(static=True))
    granularity: int = dataclasses.field(default=1, metadata=dict(static=True))
    dense_layers: int = dataclasses.field(default=2, metadata=dict(static=True))

    draft_layers = ()
    verifier_layers = ()

    def plan(self, inputs: SelectionInputs) -> AttentionPlan:
        context = inputs.context_lengths[:, None]
        keep = _budget_count(self.budget, inputs.context_lengths)[:, None]
        positions = jnp.arange(inputs.cache_size)[None, :]
        window_start = context - jnp.maximum(keep - self.sinks, 0)
        selected = ((positions < self.sinks) | (positions >= window_start)) & (positions < context)
        indices, counts = compact_blocks(positions_to_block_mask(selected, self.granularity))
        num_layers = inputs.num_layers
        return AttentionPlan(
            block_indices=jnp.broadcast_to(indices, (num_layers, *indices.shape)),
            block_counts=jnp.broadcast_to(counts, (num_layers, *counts.shape)),
            granularity=self.granularity,
            sparse_layers=sparse_layer_flags(num_layers, self.dense_layers),
        )


class _QuerySelector:
    """Selectors that decide inside each layer, from that layer's queries: the plan carries
    the selector itself as its `QuerySelector` (a pytree, called as
    `selector(layer, q, k_cache, context_lengths)`)."""

    draft_layers = ()
    verifier_layers = ()

    def plan(self, inputs: SelectionInputs) -> AttentionPlan:
        return AttentionPlan(
            block_indices=None,
            block_counts=None,
            granularity=self.granularity,
            sparse_layers=sparse_layer_flags(inputs.num_layers, self.dense_layers),
            query_selector=self,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Quest(_QuerySelector):
    """Quest (Tang et al., 2024): page scores are upper bounds of q.k from each page's
    per-channel key min/max; the top `budget` fraction of the context's pages is read."""

    budget: jax.Array
    dense_layers: int = dataclasses.field(default=2, metadata=dict(static=True))
    granularity: int = dataclasses.field(default=QUEST_PAGE, metadata=dict(static=True))

    def __call__(self, layer, q, k_cache, context_lengths):
        del layer
        batch, size, num_kv_heads, head_dim = k_cache.shape
        pages = size // self.granularity
        keys = k_cache.astype(jnp.float32).reshape(
            batch, pages, self.granularity, num_kv_heads, head_dim
        )
        positions = jnp.arange(size).reshape(pages, self.granularity)
        valid = (positions[None] < context_lengths[:, None, None])[..., None, None]
        key_min = jnp.where(valid, keys, jnp.inf).min(axis=2)  # [B, P, H_kv, D]
        key_max = jnp.where(valid, keys, -jnp.inf).max(axis=2)
        key_min = jnp.where(jnp.isfinite(key_min), key_min, 0.0)
        key_max = jnp.where(jnp.isfinite(key_max), key_max, 0.0)
        queries = _grouped_queries(q, num_kv_heads)
        upper = jnp.einsum("btkgd,bpkd->btkgp", jnp.maximum(queries, 0), key_max) + jnp.einsum(
            "btkgd,bpkd->btkgp", jnp.minimum(queries, 0), key_min
        )
        context_pages = -(-context_lengths // self.granularity)
        importance = _head_mean_probabilities(upper * head_dim**-0.5, context_pages)
        page_valid = jnp.arange(pages)[None, :] < context_pages[:, None]
        return select_top_k(importance, page_valid, _budget_count(self.budget, context_pages))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DoubleSparsity(_QuerySelector):
    """Double Sparsity (Yang et al., 2024): approximate attention from the r calibrated
    outlier channels of each KV head (the label cache), top `budget` fraction of tokens.

    Attributes:
      budget: f32[] fraction of the context read.
      channels: i32[L, H_kv, r] the calibrated channels
        (`eval.methods.calibrate_double_sparsity`).
    """

    budget: jax.Array
    channels: jax.Array  # i32[L, H_kv, r]
    dense_layers: int = dataclasses.field(default=2, metadata=dict(static=True))
    granularity: int = dataclasses.field(default=1, metadata=dict(static=True))

    def __call__(self, layer, q, k_cache, context_lengths):
        channels = self.channels[layer]  # [H_kv, r]
        batch, size, num_kv_heads, head_dim = k_cache.shape
        label_cache = jnp.take_along_axis(
            k_cache.astype(jnp.float32), channels[None, None], axis=-1
        )  # [B, S, H_kv, r]
        queries = _grouped_queries(q, num_kv_heads)
        query_labels = jnp.take_along_axis(queries, channels[None, None, :, None], axis=-1)
        scores = jnp.einsum("btkgr,bskr->btkgs", query_labels, label_cache) * head_dim**-0.5
        importance = _head_mean_probabilities(scores, context_lengths)
        valid = jnp.arange(size)[None, :] < context_lengths[:, None]
        return select_top_k(importance, valid, _budget_count(self.budget, context_lengths))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class OracleTopP(_QuerySelector):
    """Top-p of the verifier's own head-mean attention over the context (union over the
    query positions): what SpecAttn approximates with the draft's attention."""

    attn_p: jax.Array
    dense_layers: int = dataclasses.field(default=2, metadata=dict(static=True))
    granularity: int = dataclasses.field(default=1, metadata=dict(static=True))
    backend: str = dataclasses.field(default="auto", metadata=dict(static=True))

    def __call__(self, layer, q, k_cache, context_lengths):
        del layer
        batch, size, num_kv_heads, head_dim = k_cache.shape
        queries = _grouped_queries(q, num_kv_heads)
        scores = jnp.einsum("btkgd,bskd->btkgs", queries, k_cache.astype(jnp.float32))
        valid = jnp.arange(size)[None, :] < context_lengths[:, None]
        scores = jnp.where(valid[:, None, None, None], scores * head_dim**-0.5, DEFAULT_MASK_VALUE)
        weights = jax.nn.softmax(scores, axis=-1).mean(axis=(2, 3))  # [B, T, S]
        _, indices, counts = pallas_kernels.top_p_select_dispatch(
            weights,
            jnp.broadcast_to(jnp.asarray(self.attn_p, jnp.float32), (batch,)),
            context_lengths,
            granularity=self.granularity,
            backend=self.backend,
        )
        return indices, counts

"""Attention over the KV cache, through one function:

    result = attend(q, cache, positions, context_lengths, read)

`read` says, as data, what the layer reads:
  - `DENSE`: every cache position up to each query's own (prefill, decode, dense verify);
  - `BlockRead`: the selected context blocks plus the new tokens, causally (sparse verify);
  - `SelfRead`: no cache: the keys are exactly this forward's tokens at positions 0..T-1
    (training and scoring).

`attention_path` picks, by a small explicit dispatch, one of four paths:
  - "self": `jax.nn.dot_product_attention`, causal (XLA's or cuDNN's fused attention);
  - "xla": XLA attention over the whole cache with a position mask (the one path that also
    reports the head-mean attention probabilities);
  - "kernel": the Pallas verify kernel with every context block selected (GPU, T <= 16);
  - "sparse": the Pallas sparse verify kernel over a block list, or its jnp reference.

Every path returns, besides its output, what it read: i32[B] cache positions per sequence
whose keys and values it consumed, counted by the function that read them (the Pallas kernel
from its load masks, the jnp paths from their attention masks). The KV-read statistics are
sums of these counts, never recomputed from the selection.

Shapes: `B` batch, `T` new query tokens, `S` cache positions, `H` query heads, `H_kv` KV
heads, `G = H // H_kv`, `D` head dim, `N` selected blocks, `L` layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import DEFAULT_MASK_VALUE
from specattn_jax.cache import LayerCache

# Up to this many new tokens per forward (decode and verify), dense layers on GPU use the
# verify kernel with every block selected instead of XLA's attention over the whole cache.
MAX_KERNEL_TOKENS = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseRead:
    """Read every cache position up to each query's own."""


DENSE = DenseRead()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockRead:
    """Read the context blocks `block_indices[b, :block_counts[b]]` (block i covers positions
    [i * granularity, (i + 1) * granularity), clipped to the context) plus the new tokens."""

    block_indices: jax.Array  # i32[B, N]
    block_counts: jax.Array  # i32[B]
    granularity: int = dataclasses.field(metadata=dict(static=True), default=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelfRead:
    """No cache: attend causally over this forward's own keys (positions 0..T-1).

    Attributes:
      implementation: `jax.nn.dot_product_attention`'s: None (XLA picks), "xla" or "cudnn".
    """

    implementation: str | None = dataclasses.field(metadata=dict(static=True), default=None)


Read = DenseRead | BlockRead | SelfRead

# A query-dependent selector (Quest, Double Sparsity, the oracle): (layer, queries
# [B, T, H, D], keys [B, S, H_kv, D], context_lengths i32[B]) -> (block_indices i32[B, N],
# block_counts i32[B]). A pytree (its arrays traced), called inside the layer.
QuerySelector = Callable[[int, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Which KV entries each verifier layer reads during one forward.

    Layers with `sparse_layers[l] == False` attend densely. A sparse layer reads, for each
    sequence, the context blocks `block_indices[l, b, :block_counts[l, b]]` plus the new
    tokens of this forward, causally. A selector that needs the layer's own queries (Quest,
    Double Sparsity, the oracle) leaves the lists None and sets `query_selector`, a
    `QuerySelector` that runs inside the layer.

    Attributes:
      block_indices: i32[L, B, N] selected block ids, ascending, compacted to the front.
      block_counts: i32[L, B] number of valid ids per row.
      granularity: tokens per block (static).
      sparse_layers: per verifier layer, whether it reads sparsely (static).
      query_selector: a `QuerySelector`, or None.
    """

    block_indices: jax.Array | None  # i32[L, B, N]
    block_counts: jax.Array | None  # i32[L, B]
    granularity: int = dataclasses.field(metadata=dict(static=True), default=1)
    sparse_layers: tuple[bool, ...] = dataclasses.field(metadata=dict(static=True), default=())
    query_selector: QuerySelector | None = None

    def read(self, layer: int, q: jax.Array, cache: LayerCache, context_lengths: jax.Array) -> Read:
        """What layer `layer` reads, given its queries [B, T, H, D] and its cache."""
        if not self.sparse_layers[layer]:
            return DENSE
        if self.query_selector is not None:
            indices, counts = self.query_selector(layer, q, cache.k, context_lengths)
        else:
            indices, counts = self.block_indices[layer], self.block_counts[layer]
        return BlockRead(indices, counts, self.granularity)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionOutput:
    """What one layer's attention returns.

    Attributes:
      out: [B, T, H, D] in the queries' dtype.
      kv_read: i32[B] cache positions read per sequence, counted by the path that read them.
      summary: f32[B, T, S] head-mean attention probabilities over the cache (zero where not
        read; all zero for a sparse read, whose kernel does not report them), when asked for.
    """

    out: jax.Array
    kv_read: jax.Array
    summary: jax.Array | None = None


# Attention functions: `attend` and anything with its signature (`sharding.HeadParallel`).
Attend = Callable[..., AttentionOutput]


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


def self_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, T, H_kv, D]
    v: jax.Array,  # [B, T, H_kv, D]
    implementation: str | None,
) -> tuple[jax.Array, jax.Array]:
    """Causal attention over the forward's own keys (query t reads keys 0..t), fused by
    `jax.nn.dot_product_attention`: (output [B, T, H, D], positions read i32[B] = T)."""
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    batch, num_tokens = q.shape[:2]
    return out, jnp.full((batch,), num_tokens, jnp.int32)


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
    attended causally whatever the selection. Returns the output [B, T, H, D] and the
    positions read i32[B]. `backend` picks the Pallas kernel ("pallas"), the jnp reference
    ("reference"), or the kernel on GPU and the reference elsewhere ("auto").
    """
    out, reads = pallas_kernels.sparse_verify_attention_dispatch(
        q, k, v, block_indices, block_counts, context_lengths,
        granularity=granularity, return_reads=True, backend=backend,
    )  # fmt: skip
    return out, _per_sequence(reads)


def attention_path(
    read: Read, backend: str, num_new: int, head_dim: int, return_summary: bool
) -> str:
    """Which path computes a read: "self", "xla", "kernel" or "sparse" (all static: shapes,
    backend, what is asked for)."""
    if isinstance(read, BlockRead):
        return "sparse"
    if return_summary:
        return "xla"
    if isinstance(read, SelfRead):
        return "self"
    if pallas_kernels.use_verify_kernel(backend, head_dim) and num_new <= MAX_KERNEL_TOKENS:
        return "kernel"
    return "xla"


def attend(
    q: jax.Array,  # [B, T, H, D]
    cache: LayerCache,  # [B, S, H_kv, D] each, this forward's keys and values written
    positions: jax.Array,  # i32[B, T] the queries' cache positions
    context_lengths: jax.Array,  # i32[B] positions before this forward's tokens
    read: Read,
    *,
    backend: str = "auto",
    return_summary: bool = False,
) -> AttentionOutput:
    """One layer's attention: `read` over `cache` by the path `attention_path` picks.

    `backend` ("auto", "pallas" or "reference") picks between the Pallas kernels and their
    jnp references for the kernel paths ("auto": the kernels on a CUDA GPU).
    """
    num_new, head_dim = q.shape[1], q.shape[-1]
    path = attention_path(read, backend, num_new, head_dim, return_summary)
    summary = None
    if path == "self":
        out, kv_read = self_attention(q, cache.k, cache.v, read.implementation)
    elif path == "xla":
        out, kv_read, summary = dense_attention(
            q, cache.k, cache.v, positions, return_summary=return_summary
        )
    elif path == "kernel":
        out, kv_read = dense_kernel_attention(q, cache.k, cache.v, context_lengths)
    else:
        out, kv_read = sparse_attention(
            q, cache.k, cache.v, read.block_indices, read.block_counts, context_lengths,
            granularity=read.granularity, backend=backend,
        )  # fmt: skip
    if return_summary and summary is None:
        summary = jnp.zeros((q.shape[0], num_new, cache.max_len), jnp.float32)
    return AttentionOutput(out.astype(q.dtype), kv_read, summary)

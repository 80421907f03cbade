"""Attention over the KV cache, through one function:

    result = attend(q, cache, positions, context_lengths, read)

`read` says, as data, what the layer reads:
  - `DENSE`: every cache position up to each query's own (prefill, decode, dense verify);
  - `BlockRead`: the selected context blocks plus the new tokens, causally (sparse verify);
  - `SelfRead`: no cache: the keys are exactly this forward's tokens at positions 0..T-1
    (training and scoring).

`attention_path` picks, by a small explicit dispatch, one of five paths:
  - "self": `jax.nn.dot_product_attention`, causal (XLA's or cuDNN's fused attention);
  - "xla": XLA attention over the whole cache with a position mask (it holds f32[B, H, T, S]
    scores, so it serves forwards of a few tokens, and the head-mean attention probabilities
    off the GPU or of more than 16 tokens);
  - "kernel": the Pallas verify kernel with every context block selected (GPU, T <= 16); it
    also writes the logits it computes, from which the head-mean probabilities follow;
  - "prefill": more than 16 new tokens (prefill and its chunks): blockwise attention that
    never holds scores over the whole cache (cuDNN's fused attention when the cache held
    nothing before, on a GPU in 16-bit; otherwise an online softmax over KV blocks, in jnp);
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
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import DEFAULT_MASK_VALUE
from specattn_jax.cache import LayerCache

# Up to this many new tokens per forward (decode and verify), dense layers use the verify
# kernel (GPU) or XLA's attention over the whole cache (elsewhere); more take "prefill".
MAX_KERNEL_TOKENS = 16

# Tiles of the blockwise prefill attention (queries x keys per step). Its f32 scores per step
# are B * H * block_q * block_k: 4 MiB per head and sequence on a GPU, 1 MiB elsewhere.
PREFILL_BLOCKS = {"gpu": (1024, 1024), "cpu": (512, 512)}

# cuDNN's fused attention takes these dtypes and head dims.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_HEAD_DIMS = (64, 128)


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
        read), when asked for.
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
      attention: f32[L', B, T, S] head-mean attention probabilities over cache positions of
        the L' layers asked for (a sparse layer's are zero where it did not read), else None.
      kv_read: i32[L, B] cache positions each layer's attention read per sequence, as counted
        by the attention that read them (the selected context, at the granularity read and
        clipped to the context, plus the T new tokens).
      kv_dense: i32[B] positions a dense layer reads: context + T.
      queries: [L, B, T, H, D] every layer's RoPE'd queries (when asked for), else None.
      keys: [L, B, T, H_kv, D] every layer's RoPE'd keys of the new tokens (when asked for),
        else None.
    """

    attention: jax.Array | None
    kv_read: jax.Array  # i32[L, B]
    kv_dense: jax.Array  # i32[B]
    queries: jax.Array | None = None
    keys: jax.Array | None = None


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
    scores, visible = causal_scores(q, k, query_positions)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, H_kv, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    summary = probs.mean(axis=(1, 2)) if return_summary else None
    reads = jnp.sum(visible.any(axis=1), axis=-1, dtype=jnp.int32)
    return out.reshape(batch, num_tokens, num_heads, head_dim), reads, summary


def causal_scores(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    query_positions: jax.Array,  # i32[B, T]
) -> tuple[jax.Array, jax.Array]:
    """Scaled attention logits f32[B, H_kv, G, T, S] of queries over keys at positions 0..S-1,
    `DEFAULT_MASK_VALUE` where a key lies after its query, and that visibility bool[B, T, S]."""
    batch, num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    key_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
    visible = key_positions[None, None, :] <= query_positions[:, :, None]
    return jnp.where(visible[:, None, None], scores, DEFAULT_MASK_VALUE), visible


def head_mean_log_probabilities(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    query_positions: jax.Array,  # i32[B, T]
) -> jax.Array:  # f32[B, T, S]
    """The log of the head-mean causal attention probabilities, in log space throughout (a
    log-sum-exp over heads of each head's log-softmax), so it can be differentiated. Keys
    after their query get a large negative finite value, not -inf."""
    scores, visible = causal_scores(q, k, query_positions)
    log_probs = jax.nn.log_softmax(scores, axis=-1)
    num_heads = scores.shape[1] * scores.shape[2]
    mean = jax.nn.logsumexp(log_probs, axis=(1, 2)) - jnp.log(num_heads)
    return jnp.where(visible, mean, DEFAULT_MASK_VALUE)


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


def blockwise_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    v: jax.Array,  # [B, S, H_kv, D]
    context_lengths: jax.Array,  # i32[B]
    *,
    block_q: int,
    block_k: int,
) -> tuple[jax.Array, jax.Array]:
    """Causal attention of T new queries over the cache by an online softmax over KV blocks.

    Query t of row b sits at position `context_lengths[b] + t` and reads every cache position
    up to its own (the new keys already written). Query blocks run one after another
    (`lax.map`), and each reads only the KV blocks below its last query's position, so memory
    holds f32[B, H, block_q, block_k] scores at a time, never [T, S]. Returns the output
    [B, T, H, D] (f32 accumulation) and the positions read i32[B], counted from the masks.
    """
    batch, num_tokens, num_heads, head_dim = q.shape
    seq_len, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    block_q, block_k = min(block_q, num_tokens), min(block_k, seq_len)
    num_q_blocks = -(-num_tokens // block_q)
    padded = num_q_blocks * block_q
    q = jnp.pad(q, ((0, 0), (0, padded - num_tokens), (0, 0), (0, 0)))
    q = q.reshape(batch, num_q_blocks, block_q, num_kv_heads, groups, head_dim)
    q_blocks = q.transpose(1, 0, 3, 4, 2, 5)  # [n_q, B, H_kv, G, block_q, D]
    scale = head_dim**-0.5
    key_offsets = jnp.arange(block_k, dtype=jnp.int32)

    def query_block(args):
        index, q_block = args
        query_tokens = index * block_q + jnp.arange(block_q, dtype=jnp.int32)
        query_positions = context_lengths[:, None] + query_tokens  # [B, block_q]
        real_query = (query_tokens < num_tokens)[None, :, None]  # not the block's padding
        last = jnp.max(context_lengths) + jnp.minimum((index + 1) * block_q, num_tokens) - 1
        num_kv_blocks = jnp.minimum(last, seq_len - 1) // block_k + 1

        def kv_block(j, carry):
            running_max, denominator, acc, read = carry
            # The last block is shifted back to fit the cache; positions an earlier block
            # already covered are masked, so every position is counted once.
            start = jnp.minimum(j * block_k, seq_len - block_k)
            key_positions = start + key_offsets
            k_block = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=1)
            v_block = jax.lax.dynamic_slice_in_dim(v, start, block_k, axis=1)
            visible = (key_positions >= j * block_k)[None, None, :] & (
                key_positions[None, None, :] <= query_positions[:, :, None]
            )  # [B, block_q, block_k]
            # Rows no real query reads (stale, past every query) are zeroed: 0 * NaN leaks.
            reached = (visible & real_query).any(axis=1)  # [B, block_k]
            v_block = jnp.where(reached[:, :, None, None], v_block, jnp.zeros((), v_block.dtype))
            scores = jnp.einsum(
                "bkgqd,bskd->bkgqs", q_block, k_block, preferred_element_type=jnp.float32
            )
            scores = jnp.where(visible[:, None, None], scores * scale, DEFAULT_MASK_VALUE)
            new_max = jnp.maximum(running_max, scores.max(axis=-1))
            correction = jnp.exp(running_max - new_max)
            probs = jnp.where(visible[:, None, None], jnp.exp(scores - new_max[..., None]), 0.0)
            denominator = denominator * correction + probs.sum(axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bskd->bkgqd",
                probs.astype(v.dtype),
                v_block,
                preferred_element_type=jnp.float32,
            )
            read = read + jnp.sum(reached, axis=-1, dtype=jnp.int32)
            return new_max, denominator, acc, read

        stats_shape = (batch, num_kv_heads, groups, block_q)
        init = (
            jnp.full(stats_shape, DEFAULT_MASK_VALUE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
            jnp.zeros((batch,), jnp.int32),
        )
        _, denominator, acc, read = jax.lax.fori_loop(0, num_kv_blocks, kv_block, init)
        return (acc / denominator[..., None]).astype(q.dtype), read

    out, reads = jax.lax.map(query_block, (jnp.arange(num_q_blocks), q_blocks))
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, padded, num_heads, head_dim)
    # Query blocks read nested prefixes: the positions read are the largest block's.
    return out[:, :num_tokens], reads.max(axis=0)


def cudnn_takes(dtype: jnp.dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes this dtype (16-bit) and head dim."""
    return jnp.dtype(dtype) in _CUDNN_DTYPES and head_dim in _CUDNN_HEAD_DIMS


def prefill_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    v: jax.Array,  # [B, S, H_kv, D]
    context_lengths: jax.Array,  # i32[B]
    *,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Causal attention of many new tokens over the cache, never holding [T, S] scores.

    When every sequence's cache held nothing before this forward (a first prefill chunk), the
    keys it reads are exactly the T just written, at positions 0..T-1: on a CUDA GPU in
    bf16/f16 that is cuDNN's fused causal attention over them (chosen at run time by
    `lax.cond`). Every other case (a later chunk, CPU, f32, `backend="reference"`) runs
    `blockwise_attention`. Returns the output [B, T, H, D] and the positions read i32[B].
    """
    num_tokens, head_dim = q.shape[1], q.shape[-1]
    on_gpu = pallas_kernels.resolve_backend(backend) == "pallas"
    block_q, block_k = PREFILL_BLOCKS["gpu" if on_gpu else "cpu"]
    blockwise = functools.partial(blockwise_attention, block_q=block_q, block_k=block_k)
    if not (on_gpu and cudnn_takes(q.dtype, head_dim)) or num_tokens > k.shape[1]:
        return blockwise(q, k, v, context_lengths)

    def fused(q, k, v, context_lengths):
        del context_lengths  # all zero
        return self_attention(q, k[:, :num_tokens], v[:, :num_tokens], "cudnn")

    empty = jnp.all(context_lengths == 0)
    return jax.lax.cond(empty, fused, blockwise, q, k, v, context_lengths)


def dense_kernel_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, H_kv, D]
    v: jax.Array,  # [B, S, H_kv, D]
    context_lengths: jax.Array,  # i32[B]
    *,
    return_summary: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Dense decode/verify through the Pallas verify kernel (every context block selected):
    (output [B, T, H, D], positions read i32[B], and if asked the head-mean probabilities
    f32[B, T, S] from the logits the kernel wrote as it read, over the live context only)."""
    out, reads, *summary = pallas_kernels.dense_verify_attention(
        q, k, v, context_lengths, return_reads=True, return_summary=return_summary
    )
    return out, _per_sequence(reads), summary[0] if summary else None


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
    return_summary: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Verify attention reading only the selected context blocks plus the new tokens.

    The new T tokens sit at positions `context_lengths[b] + t` (already written) and are
    attended causally whatever the selection. Returns the output [B, T, H, D], the
    positions read i32[B], and if asked the head-mean probabilities f32[B, T, S] over what
    was read (zero elsewhere). `backend` picks the Pallas kernel ("pallas"), the jnp
    reference ("reference"), or the kernel on GPU and the reference elsewhere ("auto").
    """
    out, reads, *summary = pallas_kernels.sparse_verify_attention_dispatch(
        q, k, v, block_indices, block_counts, context_lengths,
        granularity=granularity, return_reads=True, return_summary=return_summary,
        backend=backend,
    )  # fmt: skip
    return out, _per_sequence(reads), summary[0] if summary else None


def attention_path(
    read: Read, backend: str, num_new: int, head_dim: int, return_summary: bool
) -> str:
    """Which path computes a read: "self", "xla", "kernel", "prefill" or "sparse" (all
    static: shapes, backend, what is asked for)."""
    if isinstance(read, BlockRead):
        return "sparse"
    if isinstance(read, SelfRead):
        return "xla" if return_summary else "self"
    if num_new <= MAX_KERNEL_TOKENS and pallas_kernels.use_verify_kernel(backend, head_dim):
        return "kernel"
    if num_new > MAX_KERNEL_TOKENS and not return_summary:
        return "prefill"
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
        out, kv_read, summary = dense_kernel_attention(
            q, cache.k, cache.v, context_lengths, return_summary=return_summary
        )
    elif path == "prefill":
        out, kv_read = prefill_attention(q, cache.k, cache.v, context_lengths, backend=backend)
    else:
        out, kv_read, summary = sparse_attention(
            q, cache.k, cache.v, read.block_indices, read.block_counts, context_lengths,
            granularity=read.granularity, backend=backend, return_summary=return_summary,
        )  # fmt: skip
    return AttentionOutput(out.astype(q.dtype), kv_read, summary)

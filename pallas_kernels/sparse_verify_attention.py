"""Block-sparse verify attention: T new queries read the selected KV blocks plus the new tokens.

Shapes: `B` batch, `T` new query tokens (gamma + 1), `S` cache positions, `H` query heads,
`H_kv` KV heads, `G = H // H_kv`, `D` head dim, `N` selected-block slots (a static maximum),
`g` granularity (tokens per block), `M = T * G` query rows per KV head.

Query t of row b attends every position `s < context_lengths[b]` of the selected blocks
`block_indices[b, :block_counts[b]]` (block i covers positions `[i*g, (i+1)*g)`), plus the new
positions `context_lengths[b] + u` for `u <= t`, which are always attended and never counted
twice. The block ids of a row must be distinct (any order; `top_p_select` lists them
ascending); ids outside the context select nothing.

The kernel is built for bandwidth: one program reads the K/V rows of one KV head for all `M`
query rows at once (the G query heads and T positions stacked into the matrix dimension), and
the selected list is split across `num_splits` programs per (batch, KV head), so one sequence
fills the GPU; a second kernel merges their partial softmax states (log-sum-exp) into the
output. Both kernels address q and the output in their own [T, H, D] layout, so no transpose,
pad or cast runs around them. Rows are gathered through the index list (a block of g rows is
contiguous in the cache).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import (
    DEFAULT_MASK_VALUE,
    cdiv,
    cdiv_dynamic,
    check_granularity,
    is_block_dim,
    log2_exact,
    next_power_of_2,
    resolve_backend,
    scatter_rows,
)

_LOG2_E = math.log2(math.e)
# Splits per (batch, KV head): enough for ~512 programs, at least 8, at most 64. Measured on an
# H100 (jax 0.11.2, dense, Q=5, 32K context; benchmarks/results): B*H_kv = 8 -> 64 splits
# (32: -13%), 64 -> 8 (same as 16), 32 -> 8-16 (4% faster than 32), 256 -> 8 (9% faster than 4).
_TARGET_PROGRAMS = 512
_MIN_SPLITS, _MAX_SPLITS = 8, 64


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of `sparse_verify_attention`.

    Attributes:
      block_k: KV rows per loop step (power of two, >= 16).
      num_splits: programs per (batch, KV head) sharing the selected list; None picks
        enough to fill the GPU.
      num_warps, num_stages: Triton compiler parameters.
    """

    block_k: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def get_default(cls, *, rows_per_head: int, head_dim: int) -> BlockSizes:
        """Defaults for M = rows_per_head stacked query rows (padded) and head_dim D."""
        if rows_per_head <= 16:
            return cls(block_k=64, num_warps=4, num_stages=3)
        if rows_per_head <= 32:
            return cls(block_k=64 if head_dim <= 64 else 32, num_warps=4, num_stages=3)
        return cls(block_k=32, num_warps=8, num_stages=3)


def default_num_splits(batch: int, num_kv_heads: int, max_rows: int, block_k: int) -> int:
    """Splits per (batch, KV head): about _TARGET_PROGRAMS programs, within
    [_MIN_SPLITS, _MAX_SPLITS], and at least 4 loop steps per split."""
    wanted = next_power_of_2(cdiv(_TARGET_PROGRAMS, batch * num_kv_heads))
    wanted = min(max(wanted, _MIN_SPLITS), _MAX_SPLITS)
    most = max(1, max_rows // (4 * block_k))
    return int(max(1, min(wanted, next_power_of_2(most + 1) // 2)))


def sparse_verify_attention_kernel(
    q_ref,  # [T * H, D] every query (row t * H + head), in q's dtype
    k_ref,  # [S, D] keys of that KV head
    v_ref,  # [S, D] values of that KV head
    indices_ref,  # [N] selected block ids
    count_ref,  # [1] number of valid ids
    length_ref,  # [1] context length (the new tokens follow it)
    o_ref,  # [M_pad, D] f32 unnormalised output of this split
    l_ref,  # [M_pad] f32 softmax denominators of this split
    m_ref,  # [M_pad] f32 running max (log2 units) of this split
    *extra_refs,  # [M_pad] i32 KV rows this split loaded (every lane), if counting reads;
    # then [M_pad, S] f32 logits (log2 units) at the positions read, if scoring
    sm_scale: float,
    granularity: int,
    block_k: int,
    block_new: int,
    num_splits: int,
    num_queries: int,
    q_heads_per_kv_head: int,
    num_heads: int,
    mask_value: float,
    return_reads: bool,
    return_scores: bool,
    contiguous: bool,
):
    read_ref = extra_refs[0] if return_reads else None
    scores_ref = extra_refs[-1] if return_scores else None
    kv_head, split = pl.program_id(0), pl.program_id(1)
    seq_len, head_dim = k_ref.shape
    rows = o_ref.shape[0]
    count = count_ref[0]
    length = length_ref[0]
    log2_granularity = log2_exact(granularity)
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    scale = sm_scale * _LOG2_E  # softmax in base 2

    # This KV head's query rows, m = t * G + g, gathered from q's own layout; rows past
    # T * G are zero.
    q_rows, q_valid = query_rows(kv_head, rows, num_queries, q_heads_per_kv_head, num_heads)
    q = pltriton.load(
        q_ref.at[q_rows[:, None], dims[None, :]], mask=q_valid[:, None], other=0.0
    ).astype(k_ref.dtype)  # [M_pad, D]

    def step(carry, positions, valid, visible):
        """Online-softmax update with K/V rows at positions (valid lanes loaded only)."""
        acc, m_prev, l_prev = carry
        k = pltriton.load(
            k_ref.at[positions[:, None], dims[None, :]], mask=valid[:, None], other=0.0
        )  # [block, D]
        v = pltriton.load(
            v_ref.at[positions[:, None], dims[None, :]], mask=valid[:, None], other=0.0
        )  # [block, D]
        s = pltriton.dot(q, k, trans_b=True) * scale  # [M_pad, block] f32
        s = jnp.where(visible, s, mask_value)
        if scores_ref is not None:  # the logits of the loaded lanes, for the summary
            # Lanes not loaded go to their own spare column past the cache, so no two lanes
            # of a store share an address (a masked store is a scatter in interpret mode).
            lane = jnp.arange(positions.shape[0], dtype=jnp.int32)
            columns = jnp.where(valid, positions, seq_len + lane)
            row_ids = jnp.arange(rows, dtype=jnp.int32)
            pltriton.store(
                scores_ref.at[row_ids[:, None], columns[None, :]],
                s,
                mask=q_valid[:, None] & valid[None, :],  # real query rows only
            )
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_next)
        probs = jnp.where(visible, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = l_prev * correction + jnp.sum(probs, axis=1)
        acc = acc * correction[:, None] + pltriton.dot(probs.astype(v.dtype), v)
        return acc, m_next, l_next

    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), mask_value, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )

    # The new tokens, read by split 0 only: position length + u is visible to rows t >= u.
    new = jnp.arange(block_new, dtype=jnp.int32)
    new_valid = (new < num_queries) & (split == 0)
    new_positions = jnp.minimum(length + new, seq_len - 1)
    query_token = lax.div(jnp.arange(rows, dtype=jnp.int32), q_heads_per_kv_head)
    new_visible = new_valid[None, :] & (new[None, :] <= query_token[:, None])
    carry = step(carry, new_positions, new_valid, new_visible)
    rows_loaded = jnp.sum(new_valid.astype(jnp.int32))

    # The selected context as a flat list of rows j = entry * g + offset; split `split` takes
    # rows [start, end), an equal share rounded up to whole steps.
    num_rows = count * granularity
    per_split = cdiv_dynamic(cdiv_dynamic(num_rows, num_splits), block_k) * block_k
    start = split * per_split
    end = jnp.minimum(start + per_split, num_rows)
    num_steps = cdiv_dynamic(jnp.maximum(end - start, 0), block_k)
    lanes = jnp.arange(block_k, dtype=jnp.int32)

    def body(i, carry):
        softmax_state, lanes_loaded = carry
        flat = start + i * block_k + lanes
        in_list = flat < end
        if contiguous:  # the list is every block in order: row j is position j, no lookup
            positions = flat
        else:
            entry = lax.shift_right_logical(flat, log2_granularity)
            block_ids = pltriton.load(indices_ref.at[entry], mask=in_list, other=0)
            positions = block_ids * granularity + (flat & (granularity - 1))
        valid = in_list & (positions >= 0) & (positions < length)
        softmax_state = step(softmax_state, positions, valid, valid[None, :])
        return softmax_state, lanes_loaded + valid.astype(jnp.int32)

    (acc, m_i, l_i), lanes_loaded = lax.fori_loop(
        0, num_steps, body, (carry, jnp.zeros((block_k,), jnp.int32))
    )
    num_valid_rows = num_queries * q_heads_per_kv_head
    if num_valid_rows == rows:
        o_ref[...] = acc
    else:  # padding rows are never read: skip their writes
        row_ids = jnp.arange(rows, dtype=jnp.int32)
        pltriton.store(
            o_ref.at[row_ids[:, None], dims[None, :]],
            acc,
            mask=(row_ids < num_valid_rows)[:, None],
        )
    l_ref[...] = l_i
    m_ref[...] = m_i
    if read_ref is not None:  # the rows whose K and V this program loaded
        rows_loaded = rows_loaded + jnp.sum(lanes_loaded)
        read_ref[...] = jnp.full((rows,), rows_loaded, jnp.int32)


def query_row(kv_head, stacked_row, q_heads_per_kv_head: int, num_heads: int):
    """The row t * H + h * G + g of the queries [T * H, D] (and of the output) that stacked
    row m = t * G + g of KV head h stands for (elementwise)."""
    token = lax.div(stacked_row, q_heads_per_kv_head)
    group = lax.rem(stacked_row, q_heads_per_kv_head)
    return token * num_heads + kv_head * q_heads_per_kv_head + group


def query_rows(kv_head, rows: int, num_queries: int, q_heads_per_kv_head: int, num_heads: int):
    """For stacked rows m in [0, rows) of KV head h: their `query_row`, clipped in range, and
    whether m < T * G (a real query)."""
    m = jnp.arange(rows, dtype=jnp.int32)
    valid = m < num_queries * q_heads_per_kv_head
    row = query_row(kv_head, m, q_heads_per_kv_head, num_heads)
    return jnp.where(valid, row, 0), valid


def combine_splits_kernel(
    o_ref,  # [splits, D] f32 unnormalised outputs of one stacked query row, per split
    l_ref,  # [splits] f32 softmax denominators
    m_ref,  # [splits] f32 running maxima (log2 units)
    out_ref,  # [T * H, D] the attention output, in q's dtype
    *lse_ref,  # [1] f32 the row's log-sum-exp (log2 units), if the summary needs it
    q_heads_per_kv_head: int,
    num_heads: int,
):
    """The last round of flash decoding: row m = t * G + g of KV head h merges its splits'
    softmax states and writes query (t, h * G + g) of the output in its own layout (and,
    when asked, the row's log-sum-exp, which turns its logits into probabilities)."""
    kv_head, stacked_row = pl.program_id(0), pl.program_id(1)
    num_splits, head_dim = o_ref.shape
    splits = jnp.arange(next_power_of_2(num_splits), dtype=jnp.int32)
    in_range = splits < num_splits
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    m = pltriton.load(m_ref.at[splits], mask=in_range, other=DEFAULT_MASK_VALUE)
    weight = jnp.where(in_range, jnp.exp2(m - jnp.max(m)), 0.0)
    denominator = jnp.sum(weight * pltriton.load(l_ref.at[splits], mask=in_range, other=0.0))
    o = pltriton.load(o_ref.at[splits[:, None], dims[None, :]], mask=in_range[:, None], other=0.0)
    out = jnp.sum(o * weight[:, None], axis=0) / (denominator + jnp.finfo(jnp.float32).eps)
    row = query_row(kv_head, stacked_row, q_heads_per_kv_head, num_heads)
    pltriton.store(out_ref.at[row, dims], out.astype(out_ref.dtype))
    if lse_ref:
        lse_ref[0][...] = jnp.full((1,), jnp.max(m) + jnp.log2(denominator), jnp.float32)


def combine_splits(
    o: jax.Array,  # [H_kv, splits, M_pad, D] f32 unnormalised outputs of the splits
    l: jax.Array,  # [H_kv, splits, M_pad] f32 softmax denominators
    m: jax.Array,  # [H_kv, splits, M_pad] f32 running maxima (log2 units)
    out_shape: tuple[int, int],  # (T * H, D): the flat output, in q's layout
    dtype,
    *,
    q_heads_per_kv_head: int,
    return_lse: bool,
    interpret: bool,
    debug: bool,
) -> list[jax.Array]:
    """`combine_splits_kernel` over (KV head, stacked row) programs: [the output [T * H, D]
    in `dtype`, and if `return_lse` each real row's log-sum-exp f32[H_kv, T * G]]."""
    num_kv_heads, num_splits, _, head_dim = o.shape
    num_heads = num_kv_heads * q_heads_per_kv_head
    rows = out_shape[0] // num_heads * q_heads_per_kv_head  # T * G
    out_specs = [pl.BlockSpec(out_shape, lambda h, r: (0, 0))]
    out_shapes = [jax.ShapeDtypeStruct(out_shape, dtype)]
    if return_lse:
        out_specs.append(pl.BlockSpec((None, 1), lambda h, r: (h, r)))
        out_shapes.append(jax.ShapeDtypeStruct((num_kv_heads, rows), jnp.float32))
    return pl.pallas_call(
        functools.partial(
            combine_splits_kernel,
            q_heads_per_kv_head=q_heads_per_kv_head,
            num_heads=num_heads,
        ),
        grid=(num_kv_heads, rows),
        in_specs=[
            pl.BlockSpec((None, num_splits, None, head_dim), lambda h, r: (h, 0, r, 0)),  # o
            pl.BlockSpec((None, num_splits, None), lambda h, r: (h, 0, r)),  # l
            pl.BlockSpec((None, num_splits, None), lambda h, r: (h, 0, r)),  # m
        ],
        out_specs=out_specs,
        out_shape=out_shapes,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        debug=debug,
        name=f"sparse_verify_attention_combine_{num_splits=}",
    )(o, l, m)


def _sparse_verify_attention_unbatched(
    q,  # [T, H, D]
    k_cache,  # [S, H_kv, D]
    v_cache,  # [S, H_kv, D]
    block_indices,  # i32[N]
    block_count,  # i32[1]
    context_length,  # i32[1]
    *,
    sm_scale: float,
    granularity: int,
    block_k: int,
    num_splits: int,
    num_warps: int,
    num_stages: int,
    mask_value: float,
    return_reads: bool,
    return_summary: bool,
    contiguous: bool,
    interpret: bool,
    debug: bool,
):
    num_queries, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k_cache.shape
    num_slots = block_indices.shape[0]
    q_heads_per_kv_head = num_heads // num_kv_heads
    rows = num_queries * q_heads_per_kv_head
    rows_padded = max(16, next_power_of_2(rows))
    block_new = max(16, next_power_of_2(num_queries))
    flat_q = q.reshape(num_queries * num_heads, head_dim)  # a bitcast: the kernel gathers rows

    kernel = functools.partial(
        sparse_verify_attention_kernel,
        sm_scale=sm_scale,
        granularity=granularity,
        block_k=block_k,
        block_new=block_new,
        num_splits=num_splits,
        num_queries=num_queries,
        q_heads_per_kv_head=q_heads_per_kv_head,
        num_heads=num_heads,
        mask_value=mask_value,
        return_reads=return_reads,
        return_scores=return_summary,
        contiguous=contiguous,
    )
    split_outputs = [
        ((num_kv_heads, num_splits, rows_padded, head_dim), jnp.float32),  # o
        ((num_kv_heads, num_splits, rows_padded), jnp.float32),  # l
        ((num_kv_heads, num_splits, rows_padded), jnp.float32),  # m
    ] + [((num_kv_heads, num_splits, rows_padded), jnp.int32)] * return_reads  # rows loaded
    out_specs = [_per_program_block(shape) for shape, _ in split_outputs]
    out_shape = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in split_outputs]
    if return_summary:  # one logits buffer per KV head; its splits write disjoint positions
        width = seq_len + max(block_k, block_new)  # spare columns for lanes not loaded
        out_specs.append(pl.BlockSpec((None, rows_padded, width), lambda h, s: (h, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((num_kv_heads, rows_padded, width), jnp.float32))
    o, l, m, *extra = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec(flat_q.shape, lambda h, s: (0, 0)),  # q, every row
            pl.BlockSpec((seq_len, None, head_dim), lambda h, s: (0, h, 0)),  # k_cache
            pl.BlockSpec((seq_len, None, head_dim), lambda h, s: (0, h, 0)),  # v_cache
            pl.BlockSpec((num_slots,), lambda h, s: (0,)),  # block_indices
            pl.BlockSpec((1,), lambda h, s: (0,)),  # block_count
            pl.BlockSpec((1,), lambda h, s: (0,)),  # context_length
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        debug=debug,
        name=f"sparse_verify_attention_{granularity=}_{block_k=}_{num_splits=}_{contiguous=}",
    )(flat_q, k_cache, v_cache, block_indices, block_count, context_length)

    out, *lse = combine_splits(
        o, l, m, flat_q.shape, q.dtype, q_heads_per_kv_head=q_heads_per_kv_head,
        return_lse=return_summary, interpret=interpret, debug=debug,
    )  # fmt: skip
    results = [out.reshape(q.shape)]
    if return_reads:
        results.append(extra[0][:, :, 0].sum(axis=1))  # i32[H_kv] rows loaded over the splits
    if return_summary:
        # Normalise the logits by each row's log-sum-exp (log2 units); positions the kernel
        # did not read (never written) are masked by the selection.
        scores = extra[-1][:, :rows, :seq_len]  # [H_kv, M, S]
        probs = jnp.exp2(scores - lse[0][..., None])
        probs = probs.reshape(num_kv_heads, num_queries, q_heads_per_kv_head, seq_len)
        if contiguous:  # the context's first block_count * g positions, then the new tokens
            positions = jnp.arange(seq_len)
            context = positions < jnp.minimum(block_count[0] * granularity, context_length[0])
            offset = positions[None, :] - context_length[0]
            new = (offset >= 0) & (offset <= jnp.arange(num_queries)[:, None])
            read = context[None, :] | new  # [T, S]
        else:
            read = selection_mask(
                block_indices[None],
                block_count,
                context_length,
                num_queries,
                seq_len,
                granularity,
            )[0]  # [T, S]
        results.append(jnp.where(read, probs.mean(axis=(0, 2)), 0.0))  # f32[T, S]
    return results[0] if len(results) == 1 else tuple(results)


def _per_program_block(shape: tuple[int, ...]) -> pl.BlockSpec:
    """The block of an output [H_kv, splits, ...] that program (h, s) writes."""
    trailing = (0,) * (len(shape) - 2)
    return pl.BlockSpec((None, None, *shape[2:]), lambda h, s: (h, s, *trailing))


def kernel_supports(head_dim: int) -> bool:
    """Whether the kernel handles this head dim (a power of two >= 16, for `pltriton.dot`)."""
    return is_block_dim(head_dim)


def _check_inputs(q, k_cache, v_cache, block_indices, block_counts, context_lengths, granularity):
    if q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError(
            f"q must be [B, T, H, D] and k_cache [B, S, H_kv, D]; got {q.shape} and "
            f"{k_cache.shape}."
        )
    batch, num_queries, num_heads, head_dim = q.shape
    _, seq_len, num_kv_heads, head_dim_k = k_cache.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must match.")
    if k_cache.shape[0] != batch or head_dim_k != head_dim:
        raise ValueError(f"q {q.shape} and k_cache {k_cache.shape} disagree on B or D.")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}.")
    check_granularity(granularity)
    if block_indices.ndim != 2 or block_indices.shape[0] != batch:
        raise ValueError(f"block_indices must be i32[B={batch}, N], got {block_indices.shape}.")
    for name, x in (("block_counts", block_counts), ("context_lengths", context_lengths)):
        if x.shape != (batch,):
            raise ValueError(f"{name} must be i32[B={batch}], got shape {x.shape}.")
    for name, x in (
        ("block_indices", block_indices),
        ("block_counts", block_counts),
        ("context_lengths", context_lengths),
    ):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {x.dtype}.")
    if num_queries > seq_len:
        raise ValueError(f"{num_queries=} new tokens do not fit a cache of {seq_len=}.")


@functools.partial(
    jax.jit,
    static_argnames=(
        "granularity",
        "sm_scale",
        "block_sizes",
        "mask_value",
        "return_reads",
        "return_summary",
        "contiguous",
        "interpret",
        "debug",
    ),
)
def sparse_verify_attention(
    q: jax.Array,  # [B, T, H, D]
    k_cache: jax.Array,  # [B, S, H_kv, D]
    v_cache: jax.Array,  # [B, S, H_kv, D]
    block_indices: jax.Array,  # i32[B, N]
    block_counts: jax.Array,  # i32[B]
    context_lengths: jax.Array,  # i32[B]
    *,
    granularity: int,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    mask_value: float = DEFAULT_MASK_VALUE,
    return_reads: bool = False,
    return_summary: bool = False,
    contiguous: bool = False,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array | tuple[jax.Array, ...]:
    """Verify attention over the selected KV blocks plus the new tokens (Pallas kernel).

    Args:
      q: [B, T, H, D] queries of the T new tokens (bf16, f16 or f32).
      k_cache, v_cache: [B, S, H_kv, D]; the new tokens are already written at positions
        context_lengths[b] + t.
      block_indices: i32[B, N] distinct block ids at `granularity`; entries past
        block_counts[b] are ignored.
      block_counts: i32[B] in [0, N].
      context_lengths: i32[B] cached tokens before the new ones.
      granularity: tokens per block, one of (1, 16, 32, 64).
      sm_scale: softmax scale, 1/sqrt(D) if None.
      block_sizes: tiling (`BlockSizes.get_default` if None).
      mask_value: the finite masked logit.
      return_reads: also return what the kernel read: i32[B, H_kv], per sequence and KV
        head, the cache rows whose keys and values its programs loaded (counted in the
        kernel from its load masks: the new tokens plus the selected context).
      return_summary: also return f32[B, T, S], the head-mean attention probabilities of
        each query over the positions it read (zero elsewhere; each row sums to 1). The
        kernel writes the logits of the rows it loads, so the summary costs one f32 per
        (query head, position read), not a second pass over the keys.
      contiguous: each row's list is blocks 0, 1, ..., block_counts[b] - 1 in order, so
        the kernel reads the context rows in order and `block_indices` is not read (any
        i32[B, N >= 1]: `dense_verify_attention` passes one column, which no kernel
        before this one has to write).
      interpret, debug: forwarded to `pallas_call`.

    Returns:
      [B, T, H, D] in q's dtype (float32 accumulation); with `return_reads` and/or
      `return_summary`, the tuple (out, reads, summary) of those asked for.
    """
    _check_inputs(q, k_cache, v_cache, block_indices, block_counts, context_lengths, granularity)
    batch, num_queries, num_heads, head_dim = q.shape
    if not kernel_supports(head_dim):
        raise ValueError(f"{head_dim=} must be a power of two >= 16 (use the reference).")
    num_kv_heads = k_cache.shape[2]
    rows_padded = max(16, next_power_of_2(num_queries * (num_heads // num_kv_heads)))
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(rows_per_head=rows_padded, head_dim=head_dim)
    # The most context rows a sequence's list can hold.
    num_slots = cdiv(k_cache.shape[1], granularity) if contiguous else block_indices.shape[1]
    num_splits = block_sizes.num_splits or default_num_splits(
        batch, num_kv_heads, num_slots * granularity, block_sizes.block_k
    )
    impl = functools.partial(
        _sparse_verify_attention_unbatched,
        sm_scale=float(head_dim**-0.5 if sm_scale is None else sm_scale),
        granularity=granularity,
        block_k=block_sizes.block_k,
        num_splits=num_splits,
        num_warps=block_sizes.num_warps,
        num_stages=block_sizes.num_stages,
        mask_value=mask_value,
        return_reads=return_reads,
        return_summary=return_summary,
        contiguous=contiguous,
        interpret=interpret,
        debug=debug,
    )
    return jax.vmap(impl)(
        q,
        k_cache,
        v_cache,
        block_indices.astype(jnp.int32),
        block_counts.astype(jnp.int32)[:, None],
        context_lengths.astype(jnp.int32)[:, None],
    )


def dense_block_list(
    context_lengths: jax.Array,  # i32[B]
    seq_len: int,
    granularity: int,
) -> tuple[jax.Array, jax.Array]:
    """Every block of each row's context: (i32[B, ceil(S / g)] ids, i32[B] counts).

    With it, `sparse_verify_attention` is dense verify attention (the baseline).
    """
    num_blocks = cdiv(seq_len, granularity)
    batch = context_lengths.shape[0]
    indices = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32), (batch, num_blocks))
    return indices, dense_block_counts(context_lengths, seq_len, granularity)


def dense_block_counts(context_lengths: jax.Array, seq_len: int, granularity: int) -> jax.Array:
    """i32[B] blocks of `granularity` that each row's context spans (at most ceil(S / g))."""
    counts = (context_lengths.astype(jnp.int32) + granularity - 1) // granularity
    return jnp.minimum(counts, cdiv(seq_len, granularity))


def dense_verify_attention(
    q: jax.Array,  # [B, T, H, D]
    k_cache: jax.Array,  # [B, S, H_kv, D]
    v_cache: jax.Array,  # [B, S, H_kv, D]
    context_lengths: jax.Array,  # i32[B]
    *,
    granularity: int = 64,
    **kwargs,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Dense verify: `sparse_verify_attention` with every context block selected, read in
    order (`contiguous`) where `reads_in_order` says that is faster."""
    contiguous = reads_in_order(q.shape[0], q.shape[2], k_cache.shape[2])
    if contiguous:  # the ids are not read: one column stands for them
        indices = jnp.zeros((q.shape[0], 1), jnp.int32)
        counts = dense_block_counts(context_lengths, k_cache.shape[1], granularity)
    else:
        indices, counts = dense_block_list(context_lengths, k_cache.shape[1], granularity)
    return sparse_verify_attention(
        q, k_cache, v_cache, indices, counts, context_lengths, granularity=granularity,
        contiguous=contiguous, **kwargs,
    )  # fmt: skip


def reads_in_order(batch: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the dense read goes faster in order than through its block ids.

    Measured on one H200 (bench_kernels, bf16, D = 128 unless said, 16K and 32K; in order
    against looked up): grouped heads gain (32/8 heads: 10-13% at batch 1, 19-20% at batch 8;
    the TinyLlama draft's 32/4 heads, D = 64, batch 1: 13-15%), and 32/32 heads at batch 8
    4-5%; but 32/32 heads at batch 1 lose 8-13%, so they keep the lookups.
    """
    return num_heads > num_kv_heads or batch > 1


def use_kernel(backend: str, head_dim: int) -> bool:
    """Whether `backend` runs the kernel: "pallas" always, "auto" on GPU where it applies."""
    if backend == "auto":
        return resolve_backend(backend) == "pallas" and kernel_supports(head_dim)
    return resolve_backend(backend) == "pallas"


def sparse_verify_attention_dispatch(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    context_lengths: jax.Array,
    *,
    granularity: int,
    sm_scale: float | None = None,
    return_reads: bool = False,
    return_summary: bool = False,
    backend: str = "auto",
) -> jax.Array | tuple[jax.Array, ...]:
    """`sparse_verify_attention` on GPU ("pallas"), the reference elsewhere ("reference").

    backend: "auto" (the kernel on a CUDA GPU for head dims it supports, else the
    reference), "pallas" or "reference". `return_reads`, `return_summary`: as both ops
    define them.
    """
    op = (
        sparse_verify_attention
        if use_kernel(backend, q.shape[-1])
        else sparse_verify_attention_reference
    )
    return op(
        q,
        k_cache,
        v_cache,
        block_indices,
        block_counts,
        context_lengths,
        granularity=granularity,
        sm_scale=sm_scale,
        return_reads=return_reads,
        return_summary=return_summary,
    )


def selection_mask(
    block_indices: jax.Array,  # i32[B, N]
    block_counts: jax.Array,  # i32[B]
    context_lengths: jax.Array,  # i32[B]
    num_queries: int,
    seq_len: int,
    granularity: int,
) -> jax.Array:
    """bool[B, T, S]: which cache positions each new query reads (selected context + new)."""
    batch, num_slots = block_indices.shape
    num_blocks = cdiv(seq_len, granularity)
    in_list = jnp.arange(num_slots)[None, :] < block_counts[:, None]
    ids = jnp.where(in_list & (block_indices >= 0), block_indices, num_blocks)
    blocks = scatter_rows(
        jnp.zeros((batch, num_blocks), jnp.bool_), ids, jnp.ones(ids.shape, jnp.bool_)
    )
    positions = jnp.arange(seq_len)
    selected = jnp.repeat(blocks, granularity, axis=1)[:, :seq_len]
    context = selected & (positions[None, :] < context_lengths[:, None])  # [B, S]
    offset = positions[None, None, :] - context_lengths[:, None, None]  # [B, 1, S]
    new = (offset >= 0) & (offset <= jnp.arange(num_queries)[None, :, None])  # [B, T, S]
    return context[:, None, :] | new


@functools.partial(
    jax.jit, static_argnames=("granularity", "sm_scale", "return_reads", "return_summary")
)
def sparse_verify_attention_reference(
    q: jax.Array,  # [B, T, H, D]
    k_cache: jax.Array,  # [B, S, H_kv, D]
    v_cache: jax.Array,  # [B, S, H_kv, D]
    block_indices: jax.Array,  # i32[B, N]
    block_counts: jax.Array,  # i32[B]
    context_lengths: jax.Array,  # i32[B]
    *,
    granularity: int,
    sm_scale: float | None = None,
    return_reads: bool = False,
    return_summary: bool = False,
) -> jax.Array | tuple[jax.Array, ...]:
    """Plain-jnp float32 definition of `sparse_verify_attention` (same data arguments).

    It computes logits over every cache position and masks them, so the keys and values it
    does not select must be finite. With `return_reads`, it also returns i32[B, H_kv]: the
    positions its mask lets some query attend (the same for every KV head); with
    `return_summary`, f32[B, T, S]: the head-mean probabilities.
    """
    _check_inputs(q, k_cache, v_cache, block_indices, block_counts, context_lengths, granularity)
    batch, num_queries, num_heads, head_dim = q.shape
    _, seq_len, num_kv_heads, _ = k_cache.shape
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    mask = selection_mask(
        block_indices, block_counts, context_lengths, num_queries, seq_len, granularity
    )  # [B, T, S]
    q_grouped = q.reshape(batch, num_queries, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum(
        "btkgd,bskd->bkgts",
        q_grouped.astype(jnp.float32),
        k_cache.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    logits = jnp.where(mask[:, None, None], logits * sm_scale, DEFAULT_MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bskd->btkgd", probs, v_cache.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )
    out = out.reshape(q.shape).astype(q.dtype)
    results = [out]
    if return_reads:
        reads = jnp.sum(mask.any(axis=1), axis=-1, dtype=jnp.int32)  # [B]
        results.append(jnp.broadcast_to(reads[:, None], (batch, num_kv_heads)))
    if return_summary:
        results.append(probs.mean(axis=(1, 2)))  # [B, T, S]
    return results[0] if len(results) == 1 else tuple(results)

"""Dense verify attention for Hopper through Pallas' Mosaic GPU backend (TMA and wgmma).

The Triton kernel (`sparse_verify_attention`) gathers K/V rows with per-lane loads; this one
reads each step's rows of one KV head as a TMA box into shared memory, a ring of
`BlockSizes.num_stages` slots kept full ahead of the compute, and multiplies on the tensor
cores with wgmma. It computes the same thing as `dense_verify_attention` (every context
position plus the new tokens, causally), in the same flash-decoding form: the context of each
(batch, KV head) is cut into `num_splits` ranges, one program each, whose partial softmax
states the Triton kernel's merge (`combine_splits`) turns into the output.

Shapes: `B` batch, `T` new tokens, `S` cache positions, `H` query heads, `H_kv` KV heads,
`G = H // H_kv`, `D` head dim, `M = T * G <= 64` query rows per KV head (one wgmma tile of
64 rows; padding rows are zero and never written out).

What it covers: bf16/f16, D of 64 or 128, M <= 64, S >= block_k, no attention summary (the
summary's logits are the Triton kernel's). `supports` says which calls it takes. A step loads
whole boxes, so rows past a sequence's live positions are read and masked in the logits: they
must be finite (0 x NaN is NaN in the PV product), as every cache the library writes is
(zero-initialised, then written with finite keys and values). The Triton kernel loads no such
row.

On CPU the kernel runs in Mosaic GPU's interpret mode (`interpret=True`), where the two
matrix products are `jnp` dots of the shared-memory tiles instead of wgmma: the interpreter
does not model a transposed wgmma operand or one held in registers. Everything else (the
TMA ring and its barriers, the split ranges, the masks, the online softmax) is the kernel's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import DEFAULT_MASK_VALUE
from pallas_kernels.sparse_verify_attention import combine_splits, default_num_splits

_LOG2_E = math.log2(math.e)
ROWS = 64  # query rows per program: one wgmma tile
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of `verify_attention_mgpu`.

    Attributes:
      block_k: KV rows per step (a TMA box of [block_k, D]; a multiple of 64).
      num_stages: shared-memory slots of the K/V ring (copies in flight ahead of the
        compute), at least 2.
      num_splits: programs per (batch, KV head); None picks as the Triton kernel does.
    """

    block_k: int = 64
    num_stages: int = 3
    num_splits: int | None = None

    def __post_init__(self):
        if self.block_k % 64 or self.block_k <= 0:
            raise ValueError(f"block_k={self.block_k} must be a positive multiple of 64.")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be at least 2.")


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (sm90), which this kernel is built for."""
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9")


def supports(
    q_shape: tuple[int, ...], cache_shape: tuple[int, ...], dtype, block_k: int = 64
) -> bool:
    """Whether the kernel takes q [B, T, H, D] over caches [B, S, H_kv, D] of `dtype`."""
    _, num_queries, num_heads, head_dim = q_shape
    _, seq_len, num_kv_heads, _ = cache_shape
    return (
        jnp.dtype(dtype) in map(jnp.dtype, DTYPES)
        and head_dim in HEAD_DIMS
        and num_heads % num_kv_heads == 0
        and num_queries * (num_heads // num_kv_heads) <= ROWS
        and seq_len >= block_k
    )


def _split_kernel(
    q_gmem,  # [B, H_kv, ROWS, D] stacked queries, row m = t * G + g
    k_gmem,  # [B, S, H_kv, D]
    v_gmem,  # [B, S, H_kv, D]
    lengths_gmem,  # i32[B] context lengths (the new tokens follow)
    o_gmem,  # [B, H_kv, splits, ROWS, D] f32 unnormalised outputs
    l_gmem,  # [B, H_kv, splits, ROWS] f32 softmax denominators
    m_gmem,  # [B, H_kv, splits, ROWS] f32 running maxima (log2 units)
    reads_gmem,  # [B, H_kv, splits, ROWS] i32 positions this program read (every lane)
    q_smem,
    k_smem,  # [stages, block_k, D]
    v_smem,
    o_smem,  # [ROWS, D] f32
    stats_smem,  # [2, ROWS] f32: l, m
    reads_smem,  # [ROWS] i32
    q_barrier,
    k_barriers,
    v_barriers,
    *,
    sm_scale: float,
    num_queries: int,
    q_heads_per_kv_head: int,
    num_splits: int,
    mask_value: float,
    interpret: bool,
):
    batch, kv_head, split = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
    num_stages, block_k, _ = k_smem.shape
    seq_len = k_gmem.shape[1]
    scale = sm_scale * _LOG2_E  # softmax in base 2

    def layout(x, kind):
        return x if interpret else plgpu.layout_cast(x, kind)

    def iota(dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, (ROWS, block_k), dim)
        return plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), dim, layout=plgpu.Layout.WGMMA)

    # Positions [0, length + T) in order: the context, then the new tokens, which row
    # m = t * G + g sees up to its own (position <= length + t). Split `split` takes the
    # range [start, end), an equal share rounded up to whole steps.
    length = lengths_gmem[batch]
    num_rows = length + num_queries
    per_split = pl.cdiv(pl.cdiv(num_rows, num_splits), block_k) * block_k
    start = split * per_split
    end = jnp.minimum(start + per_split, num_rows)
    num_steps = pl.cdiv(jnp.maximum(end - start, 0), block_k)

    def step_offset(i):
        """The first cache row of step i's box: the step's own rows, or for a step that
        would cross the cache's end, the last block_k rows (its earlier rows masked)."""
        return jnp.minimum(start + i * block_k, seq_len - block_k)

    def fetch(i):
        slot = lax.rem(i, num_stages)
        rows = (batch, pl.ds(step_offset(i), block_k), kv_head)
        plgpu.copy_gmem_to_smem(k_gmem.at[rows], k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_gmem.at[rows], v_smem.at[slot], v_barriers.at[slot])

    plgpu.copy_gmem_to_smem(q_gmem.at[batch, kv_head], q_smem, q_barrier)
    for i in range(num_stages):
        pl.when(i < num_steps)(functools.partial(fetch, i))
    plgpu.barrier_wait(q_barrier)

    query_token = lax.div(iota(0), q_heads_per_kv_head)  # t of row m, [ROWS, block_k]
    lanes = iota(1)  # row of the box, [ROWS, block_k]

    def body(i, carry):
        acc, m_prev, l_prev = carry
        slot = lax.rem(i, num_stages)
        k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
        plgpu.barrier_wait(k_barriers.at[slot])
        if interpret:
            s = lax.dot_general(
                q_smem[...], k_tile[...], (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )  # fmt: skip
        else:

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_tile, (1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_k), jnp.float32))
        nominal = start + i * block_k
        positions = step_offset(i) + lanes
        visible = (positions >= nominal) & (positions < end) & (positions <= length + query_token)
        s = jnp.where(visible, s * scale, mask_value)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        correction = jnp.exp2(m_prev - m_next)
        probs = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
        l_next = l_prev * correction + probs.sum(axis=1)
        plgpu.barrier_wait(v_barriers.at[slot])
        if interpret:
            pv = jnp.dot(
                probs.astype(v_tile.dtype), v_tile[...], preferred_element_type=jnp.float32
            )
        else:

            def pv_product(acc_ref):
                plgpu.wgmma(acc_ref, probs.astype(v_tile.dtype), v_tile)
                return acc_ref[...]

            pv = pl.run_scoped(pv_product, plgpu.ACC(acc.shape, jnp.float32))
        acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + pv
        # The slot is free once both products have read it: refill it num_stages ahead.
        pl.when(i + num_stages < num_steps)(functools.partial(fetch, i + num_stages))
        return acc, m_next, l_next

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    carry = (
        layout(jnp.zeros(o_smem.shape, jnp.float32), plgpu.Layout.WGMMA),
        layout(jnp.full((ROWS,), mask_value, jnp.float32), row_layout),
        layout(jnp.zeros((ROWS,), jnp.float32), row_layout),
    )
    acc, m_i, l_i = lax.fori_loop(0, num_steps, body, carry)

    o_smem[...] = acc
    stats_smem.at[0][...] = l_i
    stats_smem.at[1][...] = m_i
    reads_smem[...] = layout(jnp.full((ROWS,), jnp.maximum(end - start, 0), jnp.int32), row_layout)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[batch, kv_head, split])
    plgpu.copy_smem_to_gmem(stats_smem.at[0], l_gmem.at[batch, kv_head, split])
    plgpu.copy_smem_to_gmem(stats_smem.at[1], m_gmem.at[batch, kv_head, split])
    plgpu.copy_smem_to_gmem(reads_smem, reads_gmem.at[batch, kv_head, split])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params():
    """Mosaic GPU's interpret mode (CPU), from where jax 0.10 keeps it."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "block_sizes", "mask_value", "return_reads", "interpret")
)
def verify_attention_mgpu(
    q: jax.Array,  # [B, T, H, D]
    k_cache: jax.Array,  # [B, S, H_kv, D]
    v_cache: jax.Array,  # [B, S, H_kv, D]
    context_lengths: jax.Array,  # i32[B]
    *,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    mask_value: float = DEFAULT_MASK_VALUE,
    return_reads: bool = False,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Dense verify attention: query t of row b attends positions `< context_lengths[b]`
    and the new tokens `context_lengths[b] + u` for `u <= t` (already written), as
    `dense_verify_attention` does.

    Returns [B, T, H, D] in q's dtype (f32 accumulation); with `return_reads` also
    i32[B, H_kv], the cache positions each (sequence, KV head) read: its context and new
    tokens.
    """
    batch, num_queries, num_heads, head_dim = q.shape
    _, seq_len, num_kv_heads, _ = k_cache.shape
    block_sizes = block_sizes or BlockSizes()
    if not supports(q.shape, k_cache.shape, q.dtype, block_sizes.block_k):
        raise ValueError(
            f"verify_attention_mgpu takes {DTYPES} with D in {HEAD_DIMS}, at most {ROWS} "
            f"query rows per KV head and a cache of at least block_k={block_sizes.block_k} "
            f"rows; got q {q.shape} {q.dtype} over caches {k_cache.shape}."
        )
    if k_cache.dtype != q.dtype or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be {k_cache.shape} in q's dtype {q.dtype}.")
    group = num_heads // num_kv_heads
    rows = num_queries * group
    num_splits = block_sizes.num_splits or default_num_splits(
        batch, num_kv_heads, seq_len, block_sizes.block_k
    )
    stacked = q.reshape(batch, num_queries, num_kv_heads, group, head_dim)
    stacked = stacked.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, rows, head_dim)
    stacked = jnp.pad(stacked, ((0, 0), (0, 0), (0, ROWS - rows), (0, 0)))

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    tile = (block_sizes.num_stages, block_sizes.block_k, head_dim)
    per_split = (batch, num_kv_heads, num_splits, ROWS)
    kernel = plgpu.kernel(
        functools.partial(
            _split_kernel,
            sm_scale=float(head_dim**-0.5 if sm_scale is None else sm_scale),
            num_queries=num_queries,
            q_heads_per_kv_head=group,
            num_splits=num_splits,
            mask_value=mask_value,
            interpret=interpret,
        ),
        out_type=(
            jax.ShapeDtypeStruct((*per_split, head_dim), jnp.float32),  # o
            jax.ShapeDtypeStruct(per_split, jnp.float32),  # l
            jax.ShapeDtypeStruct(per_split, jnp.float32),  # m
            jax.ShapeDtypeStruct(per_split, jnp.int32),  # reads
        ),
        scratch_types=[
            plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=swizzled),
            plgpu.SMEM(tile, q.dtype, transforms=swizzled),
            plgpu.SMEM(tile, q.dtype, transforms=swizzled),
            plgpu.SMEM((ROWS, head_dim), jnp.float32),
            plgpu.SMEM((2, ROWS), jnp.float32),
            plgpu.SMEM((ROWS,), jnp.int32),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=1, num_barriers=block_sizes.num_stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=block_sizes.num_stages),
        ],
        grid=(batch, num_kv_heads, num_splits),
        grid_names=("b", "h", "s"),
        interpret=_interpret_params() if interpret else None,
    )
    o, l, m, reads = kernel(stacked, k_cache, v_cache, context_lengths.astype(jnp.int32))

    def merge(o, l, m):
        return combine_splits(
            o, l, m, (num_queries * num_heads, head_dim), q.dtype,
            q_heads_per_kv_head=group, return_lse=False, interpret=interpret, debug=False,
        )[0]  # fmt: skip

    out = jax.vmap(merge)(o, l, m).reshape(q.shape)
    if not return_reads:
        return out
    return out, reads[..., 0].sum(axis=-1)  # i32[B, H_kv]

"""Sorting-free top-p (nucleus) selection over draft attention, compacted into block lists.

Shapes: `R` output rows (e.g. batch x draft layer), `A` rows unioned into each output row (e.g.
the gamma draft steps, or 1), `S` positions, `g` granularity, `NB = ceil(S / g)` blocks.

Semantics (`top_p_select_reference` defines them; the kernel matches it bit for bit):

* Row (r, a) looks only at valid positions `s < context_lengths[r]`.
* Masses are exact. Every weight `w` is written in fixed point relative to the row maximum
  `mx` (`mx < 2**E`): three signed limbs of `LIMB_BITS` bits, `w ~= h2 * 2**(E-12) +
  h1 * 2**(E-24) + h0 * 2**(E-36)` (round to nearest at each step, so each weight is kept
  to `2**(E-37)`). Limb sums over any subset are computed in integers, so they do not depend
  on the summation order: the kernel (any tiling, any reduction tree) and the reference agree
  exactly. `kept(t)` is the fixed-point mass of `{s valid : w[s] >= t}`.
* `pred(t)`: `kept(t) * 2**24 >= ceil(p * 2**24) * kept(0)`, in exact integer arithmetic, so
  the kept mass is at least `p` of the row's mass (to the fixed-point resolution).
* Bisection on `theta` over `[lo, hi] = [0, mx]` for `num_iters` fixed iterations:
  `mid = (lo + hi) * 0.5`; `lo = mid` if `pred(mid)` else `hi = mid`; `theta = lo`.
  If `p >= 1`, `theta = 0`, which keeps every valid entry, zeros included (so `p = 1` is
  exactly dense attention). A row with no valid entry keeps nothing.
* Position `s` of output row r is selected if `w[r, a, s] >= theta[r, a]` for any `a`, and
  block `i` (positions `[i*g, (i+1)*g)`) is selected if any of its positions is.
  `block_indices[r]` lists the selected block ids ascending, compacted to the front, then
  `FILL_INDEX` (0, always in bounds) after `block_counts[r]` entries.

The kernel runs the bisection on plain float32 sums (fast), then checks its result exactly:
`pred` is monotone in `t`, so if the exact `pred` holds at the final `lo` and fails at the
final `hi`, every decision of the float bisection was the exact one. Otherwise (a float sum
within rounding of the target, rare) it reruns the bisection on exact sums. Either way the
result is the reference's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import (
    FILL_INDEX,
    cdiv,
    cdiv_dynamic,
    check_granularity,
    compact_blocks,
    next_power_of_2,
    resolve_backend,
)

DEFAULT_NUM_ITERS = 32

LIMB_BITS = 12  # bits per fixed-point limb (three limbs: 36 bits below the row max)
_LIMB_MASK = (1 << LIMB_BITS) - 1
_P_BITS = 24  # p is rounded up to a multiple of 2**-24
_MAX_ROW_LEN = 1 << (31 - LIMB_BITS)  # limb sums stay below 2**31
_EXACT_TILE = 4096  # lanes of the exact-sum pass (each sums <= 2**19 / 4096 limbs: exact)
_MIN_EXPONENT = -90  # rows whose max is below 2**-90 use 2**-90 as their scale
_ROUND_MAGIC = 1.5 * 2.0**23  # (x + C) - C rounds x to an integer for |x| <= 2**22


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of `top_p_select`.

    Attributes:
      block_s: positions per tile of the threshold kernel's float pass; a row of at most
        `block_s` positions stays in registers for all bisection steps, a longer one is
        re-read (from L2) at every step. The exact-sum pass streams tiles of at most 4096.
      block_c: positions per tile of the compaction kernels (at least one block of `g`);
        one program per (output row, tile).
      num_warps: warps per program of the threshold kernel (one program per (r, a) row).
      num_warps_compact: warps per program of the compaction kernels.
    """

    block_s: int = 8192
    block_c: int = 4096
    num_warps: int = 16
    num_warps_compact: int = 4

    @classmethod
    def get_default(cls, seq_len: int) -> BlockSizes:
        """Rows up to 32K stay in registers (32 per thread at most); longer ones stream."""
        block_s = max(16, next_power_of_2(seq_len))
        if block_s > 32768:
            return cls(block_s=8192, num_warps=16)
        return cls(block_s=block_s, num_warps=min(32, max(4, block_s // 1024)))


# ---------------------------------------------------------------------------------------------
# Exact fixed-point masses, shared by the kernel and the reference (plain jnp on scalars or
# arrays; every operation is exact or rounds identically on every backend).


def _row_units(row_max):
    """Per-row inverse limb units 2**(12k - E) and rounding constants 1.5 * 2**(23 + E - 12k),
    k = 1, 2, 3 (top limb first), from the row max (f32, >= 0, row_max < 2**E)."""
    bits = lax.bitcast_convert_type(row_max, jnp.int32)
    exponent = jnp.maximum(((bits >> 23) & 0xFF) - 126, _MIN_EXPONENT)

    def pow2(e):  # exact 2**e for integer e in [-126, 127]
        return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)

    inv_units = [pow2(LIMB_BITS * k - exponent) for k in (1, 2, 3)]
    magics = [pow2(exponent - LIMB_BITS * k) * _ROUND_MAGIC for k in (1, 2, 3)]
    return inv_units, magics


def _limbs(w, magics):
    """Signed limbs of w >= 0, each a multiple of its unit (f32, exact), top limb first.

    (x + C) - C with C = 1.5 * 2**23 * u rounds x to the nearest multiple of u (|x| <= 2**22 u);
    the remainder x - limb is exact, and so is every step.
    """
    limbs = []
    rest = w
    for magic in magics:
        limb = (rest + magic) - magic
        rest = rest - limb
        limbs.append(limb)
    return limbs


def _normalize(sums):
    """Integer limb sums (top first: s2, s1, s0) -> 5 canonical base-2**12 limbs, low first."""
    s2, s1, s0 = sums
    s1 = s1 + (s0 >> LIMB_BITS)
    v0 = s0 & _LIMB_MASK
    s2 = s2 + (s1 >> LIMB_BITS)
    v1 = s1 & _LIMB_MASK
    v2 = s2 & _LIMB_MASK
    v3 = (s2 >> LIMB_BITS) & _LIMB_MASK
    v4 = s2 >> (2 * LIMB_BITS)
    return [v0, v1, v2, v3, v4]


def _p_limbs(p):
    """ceil(p * 2**24) as 3 base-2**12 limbs, low first."""
    p_int = jnp.ceil(jnp.clip(p, 0.0, 1.0) * float(1 << _P_BITS)).astype(jnp.int32)
    return [p_int & _LIMB_MASK, (p_int >> LIMB_BITS) & _LIMB_MASK, p_int >> (2 * LIMB_BITS)]


def _mul_limbs(a, b):
    """Product of two canonical little-endian base-2**12 numbers, canonical."""
    cols = [None] * (len(a) + len(b))
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            cols[i + j] = ai * bj if cols[i + j] is None else cols[i + j] + ai * bj
    out, carry = [], 0
    for col in cols:
        col = col + carry if col is not None else carry + 0 * a[0]
        out.append(col & _LIMB_MASK)
        carry = col >> LIMB_BITS
    return out


def _greater_equal(a, b):
    """a >= b for little-endian limb lists of equal length (entries in [0, 2**12))."""
    borrow = 0 * a[0]
    for ai, bi in zip(a, b, strict=True):
        diff = ai - bi - borrow
        borrow = (diff < 0).astype(jnp.int32)
    return borrow == 0


def _exact_pred(kept_sums, target):
    """kept * 2**24 >= target, with target = ceil(p * 2**24) * total (8 limbs)."""
    kept = _normalize(kept_sums)
    zero = 0 * kept[0]
    return _greater_equal([zero, zero, *kept, zero], target)


def _exact_target(total_sums, p):
    return _mul_limbs(_p_limbs(p), _normalize(total_sums))


def _bisect(row_max, pred, num_iters):
    """Fixed-step bisection of the largest theta in [0, row_max] with pred(theta).

    Returns (lo, hi, ever_false): theta = lo, and 1 where some step found pred false.
    """

    def body(_, carry):
        lo, hi, ever_false = carry
        mid = (lo + hi) * 0.5
        take = pred(mid)
        return (
            jnp.where(take, mid, lo),
            jnp.where(take, hi, mid),
            jnp.maximum(ever_false, jnp.logical_not(take).astype(jnp.int32)),
        )

    zero = jnp.zeros_like(row_max)
    return lax.fori_loop(0, num_iters, body, (zero, row_max, jnp.zeros(row_max.shape, jnp.int32)))


# ---------------------------------------------------------------------------------------------
# Kernels.


def top_p_threshold_kernel(
    w_ref,  # [S] weights of one (r, a) row
    p_ref,  # [1]
    length_ref,  # [1]
    theta_ref,  # [1] output
    *,
    block_s: int,
    exact_tile: int,
    num_iters: int,
    force_exact: bool,
):
    seq_len = w_ref.shape[0]
    length = jnp.minimum(length_ref[0], seq_len)
    p = p_ref[0]

    def load(start, size):
        offsets = start + jnp.arange(size, dtype=jnp.int32)
        valid = offsets < length
        w = pltriton.load(w_ref.at[offsets], mask=valid, other=0.0)
        return w.astype(jnp.float32)

    def row_reduce(tile_fn, init, size):
        """Folds tile_fn(w_tile, acc) over the row's valid tiles of `size` positions, loading
        tile i + 1 before working on tile i (the last prefetch is fully masked: no traffic)."""

        def body(i, carry):
            acc, tile = carry
            next_tile = load((i + 1) * size, size)
            return tile_fn(tile, acc), next_tile

        num_tiles = cdiv_dynamic(length, size)
        acc, _ = lax.fori_loop(0, num_tiles, body, (init, load(0, size)))
        return acc

    # The float pass keeps a row of at most block_s positions in registers across all steps.
    if seq_len <= block_s:
        w_resident = load(0, block_s)

        def fast_reduce(tile_fn, init):
            return tile_fn(w_resident, init)

    else:

        def fast_reduce(tile_fn, init):
            return row_reduce(tile_fn, init, block_s)

    def max_and_sum(w, acc):
        return jnp.maximum(acc[0], jnp.max(w)), acc[1] + jnp.sum(w)

    row_max, row_sum = fast_reduce(max_and_sum, (jnp.float32(0.0), jnp.float32(0.0)))
    inv_units, magics = _row_units(row_max)

    def exact_sums(thresholds):
        """Integer limb sums (top first) of {w >= t} for each t.

        Each lane accumulates its limbs across tiles in float32, which is exact (integer
        multiples of the unit, below 2**24 units per lane); the lanes are then summed in int32.
        """

        def tile_fn(w, acc):
            limbs = _limbs(w, magics)
            return [
                [a + jnp.where(w >= t, limb, 0.0) for a, limb in zip(acc_t, limbs, strict=True)]
                for acc_t, t in zip(acc, thresholds, strict=True)
            ]

        zero = jnp.zeros((exact_tile,), jnp.float32)
        acc = row_reduce(tile_fn, [[zero, zero, zero] for _ in thresholds], exact_tile)
        return [
            [
                jnp.sum((a * inv_unit).astype(jnp.int32))
                for a, inv_unit in zip(acc_t, inv_units, strict=True)
            ]
            for acc_t in acc
        ]

    def exact_bisection(target):
        def pred(mid):
            (kept,) = exact_sums([mid])
            return _exact_pred(kept, target)

        lo, _, _ = _bisect(row_max, pred, num_iters)
        return lo

    if force_exact:
        (total,) = exact_sums([jnp.float32(0.0)])
        theta = exact_bisection(_exact_target(total, p))
    else:
        target_f = p * row_sum

        def fast_pred(mid):
            kept = fast_reduce(
                lambda w, acc: acc + jnp.sum(jnp.where(w >= mid, w, 0.0)), jnp.float32(0.0)
            )
            return kept >= target_f

        lo, hi, ever_false = _bisect(row_max, fast_pred, num_iters)
        total, kept_lo, kept_hi = exact_sums([jnp.float32(0.0), lo, hi])
        target = _exact_target(total, p)
        confirmed = _exact_pred(kept_lo, target) & (
            (ever_false == 0) | jnp.logical_not(_exact_pred(kept_hi, target))
        )
        theta = lax.cond(confirmed, lambda: lo, lambda: exact_bisection(target))
    theta = jnp.where(p >= 1.0, jnp.float32(0.0), theta)
    theta_ref[...] = jnp.full((1,), theta, jnp.float32)


def _tile_selection(w_ref, theta_ref, length_ref, *, granularity: int, blocks_per_tile: int):
    """Program (r, tile)'s blocks: (i32[blocks_per_tile] ids, i32[blocks_per_tile] 1 where
    some valid position of the block is selected by some draft row)."""
    num_rows, seq_len = w_ref.shape
    length = jnp.minimum(length_ref[0], seq_len)
    lanes = jnp.arange(blocks_per_tile, dtype=jnp.int32)
    block_ids = pl.program_id(1) * blocks_per_tile + lanes
    positions = block_ids[:, None] * granularity + jnp.arange(granularity, dtype=jnp.int32)[None, :]
    valid = positions < length  # [blocks_per_tile, g]
    selected = jnp.zeros(positions.shape, jnp.int32)
    for a in range(num_rows):
        w = pltriton.load(w_ref.at[a, positions], mask=valid, other=0.0)
        selected = selected | (valid & (w.astype(jnp.float32) >= theta_ref[a])).astype(jnp.int32)
    return block_ids, jnp.max(selected, axis=1)


def top_p_count_kernel(
    w_ref,  # [A, S] weights of one output row
    theta_ref,  # [A]
    length_ref,  # [1]
    count_ref,  # [1] output: selected blocks in this program's tile
    *,
    granularity: int,
    blocks_per_tile: int,
):
    _, block_selected = _tile_selection(
        w_ref, theta_ref, length_ref, granularity=granularity, blocks_per_tile=blocks_per_tile
    )
    count_ref[...] = jnp.full((1,), jnp.sum(block_selected), jnp.int32)


def top_p_compact_kernel(
    w_ref,  # [A, S] weights of one output row
    theta_ref,  # [A]
    length_ref,  # [1]
    tile_counts_ref,  # [num_tiles] selected blocks per tile of this row
    indices_ref,  # [NB_pad] output: selected block ids, compacted (the whole row)
    count_ref,  # [1] output: selected blocks of the row (written by tile 0)
    *,
    granularity: int,
    blocks_per_tile: int,
):
    """Program (r, tile) writes its tile's selected ids at their rank in the row, and
    FILL_INDEX in the slots of its own range past the row's count: no two programs write
    one slot."""
    tile = pl.program_id(1)
    num_tiles = tile_counts_ref.shape[0]
    tiles = jnp.arange(next_power_of_2(num_tiles), dtype=jnp.int32)
    tile_counts = pltriton.load(tile_counts_ref.at[tiles], mask=tiles < num_tiles, other=0)
    base = jnp.sum(jnp.where(tiles < tile, tile_counts, 0))
    total = jnp.sum(tile_counts)
    block_ids, block_selected = _tile_selection(
        w_ref, theta_ref, length_ref, granularity=granularity, blocks_per_tile=blocks_per_tile
    )
    lanes = jnp.arange(blocks_per_tile, dtype=jnp.int32)
    rank = jnp.cumsum(block_selected) - block_selected
    num_selected = jnp.sum(block_selected)
    # Unselected lanes get distinct slots after the selected ones (never written on GPU;
    # interpret mode writes their old values back, so slots must not collide).
    dest = jnp.where(block_selected > 0, base + rank, base + num_selected + lanes - rank)
    pltriton.store(indices_ref.at[dest], block_ids, mask=block_selected > 0)
    fill = jnp.full(block_ids.shape, FILL_INDEX, jnp.int32)
    pltriton.store(indices_ref.at[block_ids], fill, mask=block_ids >= total)

    @pl.when(tile == 0)
    def _():
        count_ref[...] = jnp.full((1,), total, jnp.int32)


# ---------------------------------------------------------------------------------------------
# Drivers and the public op.


def _top_p_thresholds(
    weights,  # f32[R * A, S]
    p,  # f32[R * A]
    lengths,  # i32[R * A]
    *,
    num_iters: int,
    block_s: int,
    num_warps: int,
    force_exact: bool,
    interpret: bool,
    debug: bool,
):
    num_rows, seq_len = weights.shape
    kernel = functools.partial(
        top_p_threshold_kernel,
        block_s=block_s,
        exact_tile=min(block_s, _EXACT_TILE),
        num_iters=num_iters,
        force_exact=force_exact,
    )
    theta = pl.pallas_call(
        kernel,
        grid=(num_rows,),
        in_specs=[
            pl.BlockSpec((None, seq_len), lambda i: (i, 0)),  # weights
            pl.BlockSpec((1,), lambda i: (i,)),  # p
            pl.BlockSpec((1,), lambda i: (i,)),  # lengths
        ],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),  # theta
        out_shape=jax.ShapeDtypeStruct((num_rows,), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        debug=debug,
        name=f"top_p_threshold_{block_s=}_{num_iters=}",
    )(weights, p, lengths)
    return theta


def _top_p_compact(
    weights,  # f32[R, A, S]
    theta,  # f32[R, A]
    lengths,  # i32[R]
    *,
    granularity: int,
    block_c: int,
    num_warps: int,
    interpret: bool,
    debug: bool,
):
    """Two launches over (row, tile) programs: each tile counts its selected blocks, then
    writes them at the rank the counts of the tiles before it give."""
    num_rows, num_draft_rows, seq_len = weights.shape
    num_blocks = cdiv(seq_len, granularity)
    blocks_per_tile = min(max(block_c // granularity, 1), next_power_of_2(num_blocks))
    num_tiles = cdiv(num_blocks, blocks_per_tile)
    num_padded = num_tiles * blocks_per_tile
    tiling = dict(granularity=granularity, blocks_per_tile=blocks_per_tile)
    row_specs = [
        pl.BlockSpec((None, num_draft_rows, seq_len), lambda r, t: (r, 0, 0)),  # weights
        pl.BlockSpec((None, num_draft_rows), lambda r, t: (r, 0)),  # theta
        pl.BlockSpec((1,), lambda r, t: (r,)),  # lengths
    ]
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    tile_counts = pl.pallas_call(
        functools.partial(top_p_count_kernel, **tiling),
        grid=(num_rows, num_tiles),
        in_specs=row_specs,
        out_specs=pl.BlockSpec((None, 1), lambda r, t: (r, t)),
        out_shape=jax.ShapeDtypeStruct((num_rows, num_tiles), jnp.int32),
        compiler_params=params,
        interpret=interpret,
        debug=debug,
        name=f"top_p_count_{granularity=}_{blocks_per_tile=}",
    )(weights, theta, lengths)
    indices, counts = pl.pallas_call(
        functools.partial(top_p_compact_kernel, **tiling),
        grid=(num_rows, num_tiles),
        in_specs=[*row_specs, pl.BlockSpec((None, num_tiles), lambda r, t: (r, 0))],
        out_specs=[
            pl.BlockSpec((None, num_padded), lambda r, t: (r, 0)),  # block_indices
            pl.BlockSpec((1,), lambda r, t: (r,)),  # block_counts
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_rows, num_padded), jnp.int32),
            jax.ShapeDtypeStruct((num_rows,), jnp.int32),
        ],
        compiler_params=params,
        interpret=interpret,
        debug=debug,
        name=f"top_p_compact_{granularity=}_{blocks_per_tile=}",
    )(weights, theta, lengths, tile_counts)
    return indices[:, :num_blocks], counts


def _check_inputs(weights, p, context_lengths, granularity):
    if weights.ndim != 3:
        raise ValueError(f"weights must be [R, A, S], got shape {weights.shape}.")
    num_rows, _, seq_len = weights.shape
    if p.shape != (num_rows,):
        raise ValueError(f"p must be f32[R] with R={num_rows}, got shape {p.shape}.")
    if context_lengths.shape != (num_rows,):
        raise ValueError(
            f"context_lengths must be i32[R] with R={num_rows}, got shape {context_lengths.shape}."
        )
    if not jnp.issubdtype(context_lengths.dtype, jnp.integer):
        raise ValueError(f"context_lengths must be integers, got {context_lengths.dtype}.")
    check_granularity(granularity)
    if seq_len > _MAX_ROW_LEN:
        raise ValueError(f"{seq_len=} exceeds the supported maximum {_MAX_ROW_LEN}.")


@functools.partial(
    jax.jit,
    static_argnames=(
        "granularity",
        "num_iters",
        "block_sizes",
        "force_exact",
        "interpret",
        "debug",
    ),
)
def top_p_select(
    weights: jax.Array,  # f32[R, A, S]
    p: jax.Array,  # f32[R]
    context_lengths: jax.Array,  # i32[R]
    *,
    granularity: int,
    num_iters: int = DEFAULT_NUM_ITERS,
    block_sizes: BlockSizes | None = None,
    force_exact: bool = False,
    interpret: bool = False,
    debug: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-p threshold per row and the compacted list of selected blocks (Pallas kernels).

    Args:
      weights: f32[R, A, S] nonnegative weights (head-mean draft attention); the A rows of
        each output row are selected independently and unioned.
      p: f32[R] mass to keep, in (0, 1]; p >= 1 keeps every valid position.
      context_lengths: i32[R]; only positions s < context_lengths[r] are candidates.
      granularity: block size g in (1, 16, 32, 64).
      num_iters: bisection steps (static).
      block_sizes: tiling (`BlockSizes.get_default(S)` if None).
      force_exact: skip the float pre-pass and bisect on exact sums (same result; for tests).
      interpret, debug: forwarded to `pallas_call`.

    Returns:
      theta f32[R, A], block_indices i32[R, ceil(S / g)] (ascending selected ids, then
      FILL_INDEX), block_counts i32[R].
    """
    _check_inputs(weights, p, context_lengths, granularity)
    num_rows, num_draft_rows, seq_len = weights.shape
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(seq_len)
    weights = weights.astype(jnp.float32)
    p = p.astype(jnp.float32)
    lengths = context_lengths.astype(jnp.int32)
    theta = _top_p_thresholds(
        weights.reshape(num_rows * num_draft_rows, seq_len),
        jnp.repeat(p, num_draft_rows),
        jnp.repeat(lengths, num_draft_rows),
        num_iters=num_iters,
        block_s=block_sizes.block_s,
        num_warps=block_sizes.num_warps,
        force_exact=force_exact,
        interpret=interpret,
        debug=debug,
    ).reshape(num_rows, num_draft_rows)
    indices, counts = _top_p_compact(
        weights,
        theta,
        lengths,
        granularity=granularity,
        block_c=max(block_sizes.block_c, granularity),
        num_warps=block_sizes.num_warps_compact,
        interpret=interpret,
        debug=debug,
    )
    return theta, indices, counts


def top_p_select_dispatch(
    weights: jax.Array,
    p: jax.Array,
    context_lengths: jax.Array,
    *,
    granularity: int,
    num_iters: int = DEFAULT_NUM_ITERS,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`top_p_select` on GPU ("pallas"), `top_p_select_reference` elsewhere ("reference").

    backend: "auto" (the kernel on a CUDA GPU, else the reference), "pallas" or "reference".
    Both return the same values bit for bit.
    """
    if resolve_backend(backend) == "pallas":
        return top_p_select(
            weights, p, context_lengths, granularity=granularity, num_iters=num_iters
        )
    return top_p_select_reference(
        weights, p, context_lengths, granularity=granularity, num_iters=num_iters
    )


# ---------------------------------------------------------------------------------------------
# References.


def _selected_blocks(selected, granularity):
    """bool[R, S] -> (i32[R, NB] ascending selected block ids then FILL_INDEX, i32[R])."""
    num_rows, seq_len = selected.shape
    num_blocks = cdiv(seq_len, granularity)
    selected = jnp.pad(selected, ((0, 0), (0, num_blocks * granularity - seq_len)))
    return compact_blocks(selected.reshape(num_rows, num_blocks, granularity).any(axis=-1))


@functools.partial(jax.jit, static_argnames=("granularity", "num_iters"))
def top_p_select_reference(
    weights: jax.Array,  # f32[R, A, S]
    p: jax.Array,  # f32[R]
    context_lengths: jax.Array,  # i32[R]
    *,
    granularity: int,
    num_iters: int = DEFAULT_NUM_ITERS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plain-jnp definition of `top_p_select` (same arguments and results, no sort)."""
    _check_inputs(weights, p, context_lengths, granularity)
    seq_len = weights.shape[-1]
    weights = weights.astype(jnp.float32)
    p = p.astype(jnp.float32)[:, None]  # [R, 1]
    valid = jnp.arange(seq_len)[None, None, :] < context_lengths[:, None, None]  # [R, 1, S]
    w = jnp.where(valid, weights, 0.0)  # [R, A, S]
    row_max = w.max(axis=-1)  # [R, A]
    inv_units, magics = _row_units(row_max)
    limbs = _limbs(w, [m[..., None] for m in magics])
    int_limbs = [
        (limb * inv_unit[..., None]).astype(jnp.int32)
        for limb, inv_unit in zip(limbs, inv_units, strict=True)
    ]

    def sums(keep):
        return [jnp.where(keep, limb, 0).sum(axis=-1) for limb in int_limbs]

    target = _exact_target(sums(valid), p)

    def pred(mid):
        return _exact_pred(sums(valid & (w >= mid[..., None])), target)

    theta, _, _ = _bisect(row_max, pred, num_iters)
    theta = jnp.where(p >= 1.0, 0.0, theta)
    selected = (valid & (w >= theta[..., None])).any(axis=1)  # [R, S]
    return (theta, *_selected_blocks(selected, granularity))


@functools.partial(jax.jit, static_argnames=("granularity",))
def top_p_exact_reference(
    weights: jax.Array,  # f32[R, A, S]
    p: jax.Array,  # f32[R]
    context_lengths: jax.Array,  # i32[R]
    *,
    granularity: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sort-based top-p: per (r, a), the fewest largest entries whose float32 mass reaches
    p * total, plus every entry tied with the smallest kept one. Same results layout as
    `top_p_select` (theta is the smallest kept weight). For tests and benchmarks."""
    _check_inputs(weights, p, context_lengths, granularity)
    seq_len = weights.shape[-1]
    weights = weights.astype(jnp.float32)
    valid = jnp.arange(seq_len)[None, None, :] < context_lengths[:, None, None]
    w = jnp.where(valid, weights, -1.0)
    ordered = -jnp.sort(-w, axis=-1)  # descending; invalid entries (-1) last
    mass = jnp.cumsum(jnp.maximum(ordered, 0.0), axis=-1)
    total = mass[..., -1:]
    reached = mass >= p[:, None, None] * total
    first = jnp.argmax(reached, axis=-1)  # index of the last kept entry
    theta = jnp.take_along_axis(ordered, first[..., None], axis=-1)[..., 0]
    theta = jnp.where(p[:, None] >= 1.0, 0.0, jnp.maximum(theta, 0.0))
    selected = (valid & (w >= theta[..., None])).any(axis=1)
    return (theta, *_selected_blocks(selected, granularity))

"""Sorting-free top-p (nucleus) selection over draft attention, compacted into block lists.

Shapes: `R` output rows (e.g. batch x draft layer), `A` rows unioned into each output row (e.g.
the gamma draft steps, or 1), `S` positions, `g` granularity, `NB = ceil(S / g)` blocks.

Semantics (`top_p_select_reference` defines them; the kernels match it bit for bit):

* Row (r, a) looks only at valid positions `s < context_lengths[r]`; a weight that is not
  positive (zero, -0.0, NaN) counts as 0.
* Masses are exact. Every weight `w` is written in fixed point relative to the row maximum
  `mx` (`mx < 2**E`): four signed limbs of `LIMB_BITS` bits, `w ~= l1 * 2**(E-10) +
  l2 * 2**(E-20) + l3 * 2**(E-30) + l4 * 2**(E-40)` (round to nearest at each step). Limb
  sums over any subset are integers, so they do not depend on the summation order: the kernel
  (any tiling, any reduction tree) and the reference agree exactly. `kept(t)` is the
  fixed-point mass of `{s valid : w[s] >= t}`.
* `pred(t)`: `kept(t) * 2**30 >= ceil(p * 2**30) * kept(0)`, in exact integer arithmetic, so
  the kept mass is at least `p` of the row's mass (to the fixed-point resolution).
* `theta[r, a]` is the largest float `t <= mx` with `pred(t)`: the smallest weight of the
  fewest largest weights that reach p, ties kept. `pred` depends on t only through the set
  `{w >= t}`, so theta is a weight of the row. If `p >= 1`, `theta = 0`, which keeps every
  valid entry, zeros included (so `p = 1` is exactly dense attention). A row with no valid
  entry keeps nothing.
* Position `s` of output row r is selected if `w[r, a, s] >= theta[r, a]` for any `a`, and
  block `i` (positions `[i*g, (i+1)*g)`) is selected if any of its positions is.
  `block_indices[r]` lists the selected block ids ascending, compacted to the front, then
  `FILL_INDEX` (0, always in bounds) after `block_counts[r]` entries.

The reference finds theta by bisection on the bits of t (a non-negative float's bits order
like its value), one exact `pred` over the row per step. The kernels take one of two routes:

* a row of at most `BlockSizes.max_resident` positions (32K) is one program's: the row sits
  in registers, the same bisection runs on float sums, and its result is checked with exact
  sums (redone on exact sums if a float sum fell within rounding of the target: rare);
* a longer row is a radix select over the same bits: five passes, each over (row, chunk)
  programs that build a 64-bin histogram of exact limb masses (a one-hot matrix product on
  the tensor cores), each resolving six more bits of theta from the histograms of the pass
  before. Each pass reads the row once, spread over the whole GPU.

Then two launches compact the selected blocks: each (row, tile) program counts its tile's
selected blocks, then writes them at the rank the tiles before it give.
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

LIMB_BITS = 10  # bits per fixed-point limb; |limb| <= 2**10, exact in float16
NUM_LIMBS = 4  # 40 bits below the row max
_LIMB_MASK = (1 << LIMB_BITS) - 1
_P_BITS = 30  # p is rounded up to a multiple of 2**-30
_P_LIMBS = _P_BITS // LIMB_BITS  # 3
_TARGET_LIMBS = _P_LIMBS + NUM_LIMBS + 2  # ceil(p * 2**30) * total, canonical: 9
_MAX_ROW_LEN = 1 << (30 - LIMB_BITS)  # limb sums stay below 2**30
_MIN_EXPONENT = -80  # rows whose max is below 2**-80 use 2**-80 as their scale
_ROUND_MAGIC = 1.5 * 2.0**23  # (x + C) - C rounds x to an integer for |x| <= 2**22
# Radix keys: a weight's float bits less those of 2**(E - _KEY_OCTAVES), clipped at 0. Weights
# below that are below every limb's resolution (mass 0) and below every possible theta.
_KEY_OCTAVES = NUM_LIMBS * LIMB_BITS + 2
_NUM_BINS = 64  # bins per radix pass
_PASSES = ((23, 6), (17, 6), (11, 6), (5, 6), (0, 5))  # (shift, width): keys of 29 bits
_STATE = 16  # per-row state between passes: prefix, limb sums above it, target limbs
_SUB_TILE = 256  # positions per one-hot product
_MAX_BLOCK_S = 8192  # a program's limb sums stay below 2**24 (exact in float32)
_FLOAT_TARGET_SCALE = 1.0  # the bisection's float target is p * sum * this (tests skew it)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of `top_p_select`.

    Attributes:
      max_resident: rows of at most this many positions are bisected by one program each,
        the row in registers; longer rows go through the radix passes.
      num_warps: warps per program of the bisection.
      block_s: positions per program of each radix pass (a power of two, 16 to 8192).
      num_warps_radix: warps per program of the radix passes.
      block_c: positions per tile of the compaction kernels (at least one block of `g`);
        one program per (output row, tile).
      num_warps_compact: warps per program of the compaction kernels.
    """

    max_resident: int = 32768
    num_warps: int = 32
    block_s: int = 2048
    num_warps_radix: int = 4
    block_c: int = 4096
    num_warps_compact: int = 4

    @classmethod
    def get_default(cls, seq_len: int) -> BlockSizes:
        """A warp per 1024 positions of a resident row (4 to 32)."""
        return cls(num_warps=min(32, max(4, next_power_of_2(seq_len) // 1024)))


# ---------------------------------------------------------------------------------------------
# Exact fixed-point masses, shared by the kernels and the reference (plain jnp on scalars or
# arrays; every operation is exact or rounds identically on every backend).


def _pow2(e):
    """Exact 2**e (f32) for integer e in [-126, 127]."""
    return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _row_scale(row_max):
    """From the row max (f32, >= 0, row_max < 2**E): per-limb inverse units 2**(10k - E)
    and rounding constants 1.5 * 2**(23 + E - 10k), k = 1..4 (top limb first), and the float
    bits of 2**(E - _KEY_OCTAVES), the zero of the radix keys."""
    bits = lax.bitcast_convert_type(row_max, jnp.int32)
    exponent = jnp.maximum(((bits >> 23) & 0xFF) - 126, _MIN_EXPONENT)
    ks = range(1, NUM_LIMBS + 1)
    inv_units = [_pow2(LIMB_BITS * k - exponent) for k in ks]
    magics = [_pow2(exponent - LIMB_BITS * k) * _ROUND_MAGIC for k in ks]
    key_base = (exponent - _KEY_OCTAVES + 127) << 23
    return inv_units, magics, key_base


def _limbs(w, inv_units, magics):
    """Signed integer limbs of w >= 0 as f32 (exact), top limb first.

    (x + C) - C with C = 1.5 * 2**23 * u rounds x to the nearest multiple of u (|x| <= 2**22 u);
    the remainder x - limb is exact, and so is every step.
    """
    limbs = []
    rest = w
    for inv_unit, magic in zip(inv_units, magics, strict=True):
        limb = (rest + magic) - magic
        rest = rest - limb
        limbs.append(limb * inv_unit)
    return limbs


def _positive(w):
    """w where it is positive, else 0 (so -0.0 and NaN weigh nothing and order as 0)."""
    return jnp.where(w > 0, w, 0.0)


def _normalize(sums):
    """Integer limb sums (top first, NUM_LIMBS) -> NUM_LIMBS + 2 canonical base-2**10
    limbs, low first."""
    digits, carry = [], 0
    for total in reversed(sums):
        total = total + carry
        digits.append(total & _LIMB_MASK)
        carry = total >> LIMB_BITS
    return digits + [carry & _LIMB_MASK, carry >> LIMB_BITS]


def _p_limbs(p):
    """ceil(p * 2**30) as 3 base-2**10 limbs, low first."""
    p_int = jnp.ceil(jnp.clip(p, 0.0, 1.0) * float(1 << _P_BITS)).astype(jnp.int32)
    return [(p_int >> (LIMB_BITS * i)) & _LIMB_MASK for i in range(_P_LIMBS)]


def _mul_limbs(a, b):
    """Product of two canonical little-endian base-2**10 numbers, canonical."""
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
    """a >= b for little-endian limb lists of equal length (entries in [0, 2**10))."""
    borrow = 0 * a[0]
    for ai, bi in zip(a, b, strict=True):
        diff = ai - bi - borrow
        borrow = (diff < 0).astype(jnp.int32)
    return borrow == 0


def _exact_target(total_sums, p):
    """ceil(p * 2**30) * total as 9 canonical limbs, low first."""
    return _mul_limbs(_p_limbs(p), _normalize(total_sums))


def _exact_pred(kept_sums, target):
    """kept * 2**30 >= target (elementwise over the sums' shape)."""
    kept = _normalize(kept_sums)
    zero = 0 * kept[0]
    return _greater_equal([zero] * _P_LIMBS + kept, target)


def _resolve(prefix, above, hist, target, width: int):
    """One radix step: the largest digit d of the next `width` bits with pred true, given the
    limb sums `above` of the keys above the prefix's range and the histogram of the keys in
    it (NUM_LIMBS int32[_NUM_BINS], top limb first). Returns the longer prefix and the limb
    sums above its range. Digit 0 always qualifies (the step before chose it so)."""
    bins = jnp.arange(_NUM_BINS, dtype=jnp.int32)
    totals = [jnp.sum(h) for h in hist]
    cums = [jnp.cumsum(h) for h in hist]
    at_or_above = [a + t - c + h for a, t, c, h in zip(above, totals, cums, hist, strict=True)]
    ok = _exact_pred(at_or_above, target) & (bins < (1 << width))
    digit = jnp.max(jnp.where(ok, bins, 0))
    chosen = bins == digit
    above = [
        a + t - jnp.sum(jnp.where(chosen, c, 0))
        for a, t, c in zip(above, totals, cums, strict=True)
    ]
    return (prefix << width) | digit, above


def _bisect_bits(max_bits, pred):
    """(lo, hi) after 31 bisection steps on the float bits in [0, max_bits + 1): pred(lo)
    holds if pred(0) does, and hi = lo + 1 is max_bits + 1 or fails pred (if pred is
    monotone and exact; an inexact pred is checked afterwards)."""

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + ((hi - lo) >> 1)
        take = pred(mid)
        return jnp.where(take, mid, lo), jnp.where(take, hi, mid)

    return lax.fori_loop(0, 31, step, (jnp.zeros_like(max_bits), max_bits + 1))


# ---------------------------------------------------------------------------------------------
# Kernels.


def top_p_bisect_kernel(
    w_ref,  # [S] weights of one (r, a) row, S <= row_block
    p_ref,  # [1]
    length_ref,  # [1]
    theta_ref,  # [1] output
    *,
    row_block: int,
    exact_tile: int,
):
    """Theta of one row held in registers: bisection on float sums, then the result checked
    with exact sums (streamed from memory), and redone on exact sums if the check fails (a
    float sum within rounding of the target: rare)."""
    length = jnp.minimum(length_ref[0], w_ref.shape[0])
    p = p_ref[0]

    def load(start, size):
        offsets = start + jnp.arange(size, dtype=jnp.int32)
        return _positive(pltriton.load(w_ref.at[offsets], mask=offsets < length, other=0.0))

    w = load(0, row_block)
    bits = lax.bitcast_convert_type(w, jnp.int32)
    row_max = jnp.max(w)
    max_bits = lax.bitcast_convert_type(row_max, jnp.int32)
    inv_units, magics, _ = _row_scale(row_max)

    def exact_sums(thresholds):
        """Limb sums (top first) of {w >= t} for each threshold t (float bits). Each lane sums
        its limbs across tiles in float32, exact (integers below 2**24); then int32."""

        def body(i, acc):
            tile = load(i * exact_tile, exact_tile)
            tile_bits = lax.bitcast_convert_type(tile, jnp.int32)
            limbs = _limbs(tile, inv_units, magics)
            return [
                [
                    a + jnp.where(tile_bits >= t, limb, 0.0)
                    for a, limb in zip(acc_t, limbs, strict=True)
                ]
                for acc_t, t in zip(acc, thresholds, strict=True)
            ]

        zero = jnp.zeros((exact_tile,), jnp.float32)
        init = [[zero] * NUM_LIMBS for _ in thresholds]
        acc = lax.fori_loop(0, cdiv_dynamic(length, exact_tile), body, init)
        return [[jnp.sum(a.astype(jnp.int32)) for a in acc_t] for acc_t in acc]

    target_f = p * jnp.sum(w) * _FLOAT_TARGET_SCALE
    lo, hi = _bisect_bits(max_bits, lambda mid: jnp.sum(jnp.where(bits >= mid, w, 0.0)) >= target_f)
    total, kept_lo, kept_hi = exact_sums([jnp.int32(0), lo, hi])
    target = _exact_target(total, p)
    confirmed = _exact_pred(kept_lo, target) & (
        (hi > max_bits) | jnp.logical_not(_exact_pred(kept_hi, target))
    )

    def exact_bisection():
        return _bisect_bits(max_bits, lambda mid: _exact_pred(exact_sums([mid])[0], target))[0]

    theta_bits = lax.cond(confirmed, lambda: lo, exact_bisection)
    theta = jnp.where(p >= 1.0, 0.0, lax.bitcast_convert_type(theta_bits, jnp.float32))
    theta_ref[...] = jnp.full((1,), theta, jnp.float32)


def _state_vector(prefix, above, target):
    """The per-row state between passes as i32[_STATE]."""
    values = [prefix, *above, *target]
    slots = jnp.arange(_STATE, dtype=jnp.int32)
    out = jnp.zeros((_STATE,), jnp.int32)
    for i, value in enumerate(values):
        out = jnp.where(slots == i, value, out)
    return out


def _read_state(state_ref):
    """(prefix, above limb sums, target limbs) from a state block [_STATE]."""
    state = state_ref[...]
    slots = jnp.arange(_STATE, dtype=jnp.int32)

    def at(i):
        return jnp.sum(jnp.where(slots == i, state, 0))

    return (
        at(0),
        [at(1 + k) for k in range(NUM_LIMBS)],
        [at(1 + NUM_LIMBS + i) for i in range(_TARGET_LIMBS)],
    )


def _read_histograms(hist_ref):
    """NUM_LIMBS int32[_NUM_BINS] sums over the chunks of a row's histograms
    [chunks, NUM_LIMBS, _NUM_BINS]."""
    num_chunks = hist_ref.shape[0]
    chunks = jnp.arange(next_power_of_2(num_chunks), dtype=jnp.int32)
    bins = jnp.arange(_NUM_BINS, dtype=jnp.int32)
    in_range = (chunks < num_chunks)[:, None]
    return [
        jnp.sum(
            pltriton.load(hist_ref.at[chunks[:, None], k, bins[None, :]], mask=in_range, other=0),
            axis=0,
        )
        for k in range(NUM_LIMBS)
    ]


def top_p_radix_kernel(
    w_ref,  # [S] weights of one (r, a) row
    row_max_ref,  # [1] max valid positive weight (0 if none)
    length_ref,  # [1]
    p_ref,  # [1]
    *refs,  # after the first pass: the state [_STATE] and histograms [chunks, NUM_LIMBS,
    # _NUM_BINS] of the pass before; then the outputs: this pass's state [_STATE] (chunk 0
    # writes it) and this chunk's histogram [NUM_LIMBS, _NUM_BINS]
    pass_index: int,
    block_s: int,
):
    """One radix pass for program (row, chunk): resolve the bits the pass before found (each
    program of the row does the same exact arithmetic), then histogram the chunk's keys that
    share the prefix by their next `width` bits."""
    shift, width = _PASSES[pass_index]
    if pass_index == 0:
        state_ref, hist_ref = refs
        prefix, above = jnp.int32(0), [jnp.int32(0)] * NUM_LIMBS
        target = [jnp.int32(0)] * _TARGET_LIMBS
    else:
        prev_state_ref, prev_hist_ref, state_ref, hist_ref = refs
        prefix, above, target = _read_state(prev_state_ref)
        hist = _read_histograms(prev_hist_ref)
        if pass_index == 1:  # the first pass's histograms hold the total mass
            target = _exact_target([jnp.sum(h) for h in hist], p_ref[0])
        prefix, above = _resolve(prefix, above, hist, target, _PASSES[pass_index - 1][1])

    chunk = pl.program_id(1)

    @pl.when(chunk == 0)
    def _():
        state_ref[...] = _state_vector(prefix, above, target)

    inv_units, magics, key_base = _row_scale(row_max_ref[0])
    seq_len = w_ref.shape[0]
    length = jnp.minimum(length_ref[0], seq_len)
    start = chunk * block_s
    sub_tile = min(_SUB_TILE, block_s)
    lanes = jnp.arange(sub_tile, dtype=jnp.int32)
    bins = jnp.arange(_NUM_BINS, dtype=jnp.int32)
    columns = jnp.arange(16, dtype=jnp.int32)  # the limbs, padded to the smallest `dot`

    def body(i, acc):
        offsets = start + i * sub_tile + lanes
        valid = offsets < length
        w = _positive(pltriton.load(w_ref.at[offsets], mask=valid, other=0.0))
        key = jnp.maximum(lax.bitcast_convert_type(w, jnp.int32) - key_base, 0)
        member = valid & ((key >> (shift + width)) == prefix)
        digit = (key >> shift) & ((1 << width) - 1)
        one_hot = ((bins[:, None] == digit[None, :]) & member[None, :]).astype(jnp.float16)
        limb_matrix = jnp.zeros((sub_tile, 16), jnp.float32)
        for k, limb in enumerate(_limbs(w, inv_units, magics)):
            limb_matrix = jnp.where(columns[None, :] == k, limb[:, None], limb_matrix)
        return acc + pltriton.dot(one_hot, limb_matrix.astype(jnp.float16))  # [bins, 16]

    num_sub_tiles = cdiv_dynamic(jnp.clip(length - start, 0, block_s), sub_tile)
    acc = lax.fori_loop(0, num_sub_tiles, body, jnp.zeros((_NUM_BINS, 16), jnp.float32))
    for k in range(NUM_LIMBS):
        limb_sums = jnp.sum(jnp.where(columns[None, :] == k, acc, 0.0), axis=1)
        pltriton.store(hist_ref.at[k, bins], limb_sums.astype(jnp.int32))


def top_p_theta_kernel(
    row_max_ref,  # [1]
    p_ref,  # [1]
    state_ref,  # [_STATE] of the last pass
    hist_ref,  # [chunks, NUM_LIMBS, _NUM_BINS] of the last pass
    theta_ref,  # [1] output
):
    """The last pass's bits, and theta from the key (at most the row max)."""
    prefix, above, target = _read_state(state_ref)
    key, _ = _resolve(prefix, above, _read_histograms(hist_ref), target, _PASSES[-1][1])
    row_max = row_max_ref[0]
    _, _, key_base = _row_scale(row_max)
    max_bits = lax.bitcast_convert_type(row_max, jnp.int32)
    theta_bits = key_base + jnp.minimum(key, max_bits - key_base)
    theta = lax.bitcast_convert_type(theta_bits, jnp.float32)
    theta_ref[...] = jnp.full((1,), jnp.where(p_ref[0] >= 1.0, 0.0, theta), jnp.float32)


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
        kept = _positive(w.astype(jnp.float32)) >= theta_ref[a]
        selected = selected | (valid & kept).astype(jnp.int32)
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
    block_sizes: BlockSizes,
    interpret: bool,
    debug: bool,
):
    """theta f32[R * A]: bisection with the row in registers up to `max_resident`
    positions, else the radix passes."""
    num_rows, seq_len = weights.shape
    options = dict(interpret=interpret, debug=debug)
    if seq_len > block_sizes.max_resident:
        return _radix_thresholds(
            weights, p, lengths, block_s=block_sizes.block_s,
            num_warps=block_sizes.num_warps_radix, **options,
        )  # fmt: skip
    row_block = max(16, next_power_of_2(seq_len))
    return pl.pallas_call(
        functools.partial(
            top_p_bisect_kernel, row_block=row_block, exact_tile=min(row_block, 4096)
        ),
        grid=(num_rows,),
        in_specs=[
            pl.BlockSpec((None, seq_len), lambda i: (i, 0)),  # weights
            pl.BlockSpec((1,), lambda i: (i,)),  # p
            pl.BlockSpec((1,), lambda i: (i,)),  # lengths
        ],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),  # theta
        out_shape=jax.ShapeDtypeStruct((num_rows,), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=block_sizes.num_warps, num_stages=1),
        name=f"top_p_bisect_{row_block=}",
        **options,
    )(weights, p, lengths)


def _radix_thresholds(
    weights,  # f32[R * A, S]
    p,  # f32[R * A]
    lengths,  # i32[R * A]
    *,
    block_s: int,
    num_warps: int,
    interpret: bool,
    debug: bool,
):
    """theta f32[R * A]: the radix passes over (row, chunk) programs, then one program per
    row for the last bits."""
    num_rows, seq_len = weights.shape
    num_chunks = cdiv(seq_len, block_s)
    valid = jnp.arange(seq_len)[None, :] < lengths[:, None]
    row_max = jnp.max(jnp.where(valid, _positive(weights), 0.0), axis=1)  # [R * A]
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    scalar = pl.BlockSpec((1,), lambda r, c: (r,))
    state_spec = pl.BlockSpec((None, _STATE), lambda r, c: (r, 0))
    hists_spec = pl.BlockSpec((None, num_chunks, NUM_LIMBS, _NUM_BINS), lambda r, c: (r, 0, 0, 0))
    state_shape = jax.ShapeDtypeStruct((num_rows, _STATE), jnp.int32)
    hists_shape = jax.ShapeDtypeStruct((num_rows, num_chunks, NUM_LIMBS, _NUM_BINS), jnp.int32)
    carried = []
    for pass_index in range(len(_PASSES)):
        carried = pl.pallas_call(
            functools.partial(top_p_radix_kernel, pass_index=pass_index, block_s=block_s),
            grid=(num_rows, num_chunks),
            in_specs=[
                pl.BlockSpec((None, seq_len), lambda r, c: (r, 0)),  # weights
                scalar,  # row max
                scalar,  # lengths
                scalar,  # p
                *([state_spec, hists_spec] if carried else []),
            ],
            out_specs=[
                state_spec,
                pl.BlockSpec((None, None, NUM_LIMBS, _NUM_BINS), lambda r, c: (r, c, 0, 0)),
            ],
            out_shape=[state_shape, hists_shape],
            compiler_params=params,
            interpret=interpret,
            debug=debug,
            name=f"top_p_radix_pass{pass_index}_{block_s=}",
        )(weights, row_max, lengths, p, *carried)
    row = pl.BlockSpec((1,), lambda r: (r,))
    return pl.pallas_call(
        top_p_theta_kernel,
        grid=(num_rows,),
        in_specs=[
            row,  # row max
            row,  # p
            pl.BlockSpec((None, _STATE), lambda r: (r, 0)),
            pl.BlockSpec((None, num_chunks, NUM_LIMBS, _NUM_BINS), lambda r: (r, 0, 0, 0)),
        ],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct((num_rows,), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        debug=debug,
        name="top_p_theta",
    )(row_max, p, *carried)


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


@functools.partial(jax.jit, static_argnames=("granularity", "block_sizes", "interpret", "debug"))
def top_p_select(
    weights: jax.Array,  # f32[R, A, S]
    p: jax.Array,  # f32[R]
    context_lengths: jax.Array,  # i32[R]
    *,
    granularity: int,
    block_sizes: BlockSizes | None = None,
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
      block_sizes: tiling (`BlockSizes.get_default(S)` if None).
      interpret, debug: forwarded to `pallas_call`.

    Returns:
      theta f32[R, A], block_indices i32[R, ceil(S / g)] (ascending selected ids, then
      FILL_INDEX), block_counts i32[R].
    """
    _check_inputs(weights, p, context_lengths, granularity)
    num_rows, num_draft_rows, seq_len = weights.shape
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(seq_len)
    if block_sizes.block_s not in [1 << i for i in range(4, _MAX_BLOCK_S.bit_length())]:
        raise ValueError(f"block_s={block_sizes.block_s} must be a power of two in [16, 8192].")
    weights = weights.astype(jnp.float32)
    p = p.astype(jnp.float32)
    lengths = context_lengths.astype(jnp.int32)
    theta = _top_p_thresholds(
        weights.reshape(num_rows * num_draft_rows, seq_len),
        jnp.repeat(p, num_draft_rows),
        jnp.repeat(lengths, num_draft_rows),
        block_sizes=block_sizes,
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
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`top_p_select` on GPU ("pallas"), `top_p_select_reference` elsewhere ("reference").

    backend: "auto" (the kernel on a CUDA GPU, else the reference), "pallas" or "reference".
    Both return the same values bit for bit.
    """
    op = top_p_select if resolve_backend(backend) == "pallas" else top_p_select_reference
    return op(weights, p, context_lengths, granularity=granularity)


# ---------------------------------------------------------------------------------------------
# References.


def _selected_blocks(selected, granularity):
    """bool[R, S] -> (i32[R, NB] ascending selected block ids then FILL_INDEX, i32[R])."""
    num_rows, seq_len = selected.shape
    num_blocks = cdiv(seq_len, granularity)
    selected = jnp.pad(selected, ((0, 0), (0, num_blocks * granularity - seq_len)))
    return compact_blocks(selected.reshape(num_rows, num_blocks, granularity).any(axis=-1))


@functools.partial(jax.jit, static_argnames=("granularity",))
def top_p_select_reference(
    weights: jax.Array,  # f32[R, A, S]
    p: jax.Array,  # f32[R]
    context_lengths: jax.Array,  # i32[R]
    *,
    granularity: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plain-jnp definition of `top_p_select` (same arguments and results, no sort): theta
    by bisection on its float bits, one exact `pred` over the whole row per step."""
    _check_inputs(weights, p, context_lengths, granularity)
    seq_len = weights.shape[-1]
    p = p.astype(jnp.float32)[:, None]  # [R, 1]
    valid = jnp.arange(seq_len)[None, None, :] < context_lengths[:, None, None]  # [R, 1, S]
    w = jnp.where(valid, _positive(weights.astype(jnp.float32)), 0.0)  # [R, A, S]
    row_max = w.max(axis=-1)  # [R, A]
    inv_units, magics, _ = _row_scale(row_max)
    limbs = _limbs(w, [u[..., None] for u in inv_units], [m[..., None] for m in magics])
    int_limbs = [limb.astype(jnp.int32) for limb in limbs]
    bits = lax.bitcast_convert_type(w, jnp.int32)

    def sums(keep):
        return [jnp.where(keep, limb, 0).sum(axis=-1) for limb in int_limbs]

    target = _exact_target(sums(valid), p)

    def pred(mid):
        return _exact_pred(sums(valid & (bits >= mid[..., None])), target)

    lo, _ = _bisect_bits(lax.bitcast_convert_type(row_max, jnp.int32), pred)
    theta = jnp.where(p >= 1.0, 0.0, lax.bitcast_convert_type(lo, jnp.float32))
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

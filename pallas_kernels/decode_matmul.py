"""A few activation rows times a weight, with the layer's cheap ops fused in: the matmuls of
a decode or verify step (M = B * T <= 16 rows).

At decode, a Llama layer's four projections read their weights once for a handful of rows,
and what surrounds them (the RMSNorm before the QKV and gate/up projections, the residual
add after the output and down projections, SwiGLU between gate/up and down) runs as kernels
of its own, each a launch for a few kilobytes. This kernel takes them in:

    out = epilogue(prologue(x) @ w)

  prologue: None, or RMSNorm: `norm_weight * (x * rsqrt(mean(x^2) + eps))`, rounded to x's
    dtype before the weight multiplies it, as `model.RMSNorm` rounds;
  epilogue: None; "residual", `residual + out` in x's dtype; or "swiglu", where w is
    [K, 2, F] (gate and up side by side) and `out = silu(gate) * up`, each rounded to x's
    dtype first, as the model rounds.

Shapes: x [M, K], w [K, N] (or [K, 2, F] for "swiglu"), out [M, N] (or [M, F]). One program
reads a column tile [K, block_n] of the weight in `block_k` row chunks (f32 accumulation)
for all M rows, loaded masked into 16 rows (the smallest `dot`): no padding kernel runs
before it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

EPILOGUES = (None, "residual", "swiglu")
MAX_ROWS = 16  # rows one program multiplies (the smallest `dot` tile)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling: `block_n` weight columns per program, `block_k` weight rows per loop step."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4

    @classmethod
    def get_default(cls, k: int, n: int) -> BlockSizes:
        """The widest power-of-two `block_k` (<= 256) dividing K; `block_n` 32 where it
        divides N and 128 programs or more run, else 16."""
        block_k = 256
        while k % block_k:
            block_k //= 2
        wide = n % 32 == 0 and n // 32 >= 128
        return cls(block_n=32 if wide else 16, block_k=block_k)


def supports(rows: int, k: int, n: int) -> bool:
    """Whether the kernel multiplies `rows` rows by a [K, N] weight (for swiglu, N = F):
    at most MAX_ROWS rows, K and N multiples of 16."""
    return 0 < rows <= MAX_ROWS and k % 16 == 0 and n % 16 == 0


def _kernel(
    x_ref,  # [M, K] activations
    *refs,  # norm weight [K] (with the prologue), the weight tile(s) [K, block_n] (two for
    # swiglu: gate, up), the residual tile [M, block_n] ("residual"), then the output tile
    num_rows: int,
    block_k: int,
    eps: float | None,
    epilogue: str | None,
):
    refs = list(refs)
    norm_ref = refs.pop(0) if eps is not None else None
    w_refs = [refs.pop(0)] + ([refs.pop(0)] if epilogue == "swiglu" else [])
    residual_ref = refs.pop(0) if epilogue == "residual" else None
    (o_ref,) = refs
    k_total = x_ref.shape[1]
    block_n = w_refs[0].shape[1]
    rows = jnp.arange(MAX_ROWS, dtype=jnp.int32)
    row_mask = (rows < num_rows)[:, None]
    lanes = jnp.arange(block_k, dtype=jnp.int32)
    num_steps = k_total // block_k

    def x_chunk(i):  # [16, block_k] f32, rows past M zero
        columns = i * block_k + lanes
        x = pltriton.load(x_ref.at[rows[:, None], columns[None, :]], mask=row_mask, other=0.0)
        return x.astype(jnp.float32), columns

    scale = None
    if norm_ref is not None:  # rsqrt(mean(x^2) + eps) per row, a pass over x alone

        def sum_squares(i, total):
            x, _ = x_chunk(i)
            return total + jnp.sum(x * x, axis=1)

        total = jax.lax.fori_loop(0, num_steps, sum_squares, jnp.zeros((MAX_ROWS,), jnp.float32))
        scale = jax.lax.rsqrt(total / k_total + eps)

    def body(i, accs):
        x, columns = x_chunk(i)
        if scale is not None:
            normed = (x * scale[:, None]).astype(x_ref.dtype)
            x = normed * pltriton.load(norm_ref.at[columns])[None, :].astype(x_ref.dtype)
        x = x.astype(w_refs[0].dtype)
        return tuple(
            acc + pltriton.dot(x, w_ref[pl.ds(i * block_k, block_k), :])
            for acc, w_ref in zip(accs, w_refs, strict=True)
        )

    zeros = jnp.zeros((MAX_ROWS, block_n), jnp.float32)
    accs = jax.lax.fori_loop(0, num_steps, body, (zeros,) * len(w_refs))
    out = accs[0].astype(x_ref.dtype)
    if epilogue == "swiglu":
        up = accs[1].astype(x_ref.dtype)
        gate = out.astype(jnp.float32)
        out = (gate / (1.0 + jnp.exp(-gate))).astype(x_ref.dtype) * up  # silu(gate) * up
    columns = jnp.arange(block_n, dtype=jnp.int32)
    if residual_ref is not None:
        residual = pltriton.load(
            residual_ref.at[rows[:, None], columns[None, :]], mask=row_mask, other=0.0
        )
        out = residual + out
    pltriton.store(o_ref.at[rows[:, None], columns[None, :]], out.astype(o_ref.dtype),
                   mask=row_mask)  # fmt: skip


@functools.partial(
    jax.jit, static_argnames=("eps", "epilogue", "block_sizes", "interpret", "debug")
)
def decode_matmul(
    x: jax.Array,  # [..., K]
    w: jax.Array,  # [K, ...] ([K, 2, F] for "swiglu")
    *,
    norm_weight: jax.Array | None = None,  # [K]
    eps: float | None = None,
    residual: jax.Array | None = None,  # [..., N]
    epilogue: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
    """`epilogue(prologue(x) @ w)` (see the module docstring) for at most MAX_ROWS rows.

    x's leading dims are its rows; w's trailing dims are the output's (for "swiglu", F).
    With `norm_weight` the RMSNorm (epsilon `eps`) runs first. Returns [..., N] in x's
    dtype.
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"{epilogue=} must be one of {EPILOGUES}.")
    if (norm_weight is None) != (eps is None):
        raise ValueError("norm_weight and eps go together (the RMSNorm prologue).")
    if (residual is None) != (epilogue != "residual"):
        raise ValueError('a residual goes with epilogue="residual", and only with it.')
    lead, k_dim = x.shape[:-1], x.shape[-1]
    if w.shape[0] != k_dim:
        raise ValueError(f"x {x.shape} and w {w.shape} disagree on K.")
    if epilogue == "swiglu" and (w.ndim != 3 or w.shape[1] != 2):
        raise ValueError(f"swiglu needs w [K, 2, F], got {w.shape}.")
    x2 = x.reshape(-1, k_dim)
    num_rows = x2.shape[0]
    out_dims = w.shape[2:] if epilogue == "swiglu" else w.shape[1:]
    n = math.prod(out_dims)
    w2 = w.reshape(k_dim, -1)
    if not supports(num_rows, k_dim, n):
        raise ValueError(
            f"x {x.shape} times w {w.shape}: the kernel takes 1 to {MAX_ROWS} rows and K, N "
            "multiples of 16."
        )
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(k_dim, n)
    block_n, block_k = block_sizes.block_n, block_sizes.block_k
    if k_dim % block_k or n % block_n:
        raise ValueError(f"K={k_dim} and N={n} must be multiples of {block_k=} and {block_n=}.")
    num_programs = n // block_n

    operands = [x2]
    in_specs = [pl.BlockSpec((num_rows, k_dim), lambda j: (0, 0))]
    if norm_weight is not None:
        operands.append(norm_weight)
        in_specs.append(pl.BlockSpec((k_dim,), lambda j: (0,)))
    operands.append(w2)
    in_specs.append(pl.BlockSpec((k_dim, block_n), lambda j: (0, j)))
    if epilogue == "swiglu":  # the up columns: the same tile, F columns on
        operands.append(w2)
        in_specs.append(pl.BlockSpec((k_dim, block_n), lambda j: (0, j + num_programs)))
    if residual is not None:
        operands.append(residual.reshape(num_rows, n))
        in_specs.append(pl.BlockSpec((num_rows, block_n), lambda j: (0, j)))
    out = pl.pallas_call(
        functools.partial(_kernel, num_rows=num_rows, block_k=block_k, eps=eps, epilogue=epilogue),
        grid=(num_programs,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((num_rows, block_n), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((num_rows, n), x.dtype),
        compiler_params=pltriton.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        debug=debug,
        name=f"decode_matmul_{epilogue or 'plain'}_{'norm' if eps is not None else 'raw'}",
    )(*operands)
    return out.reshape(*lead, *out_dims)


def decode_matmul_reference(
    x: jax.Array,
    w: jax.Array,
    *,
    norm_weight: jax.Array | None = None,
    eps: float | None = None,
    residual: jax.Array | None = None,
    epilogue: str | None = None,
) -> jax.Array:
    """`decode_matmul` in plain jnp, op by op as the model computes it (f32 accumulation)."""
    if norm_weight is not None:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        x = norm_weight.astype(x.dtype) * normed.astype(x.dtype)
    k_dim = x.shape[-1]
    flat = jnp.matmul(
        x.reshape(-1, k_dim), w.reshape(k_dim, -1), preferred_element_type=jnp.float32
    ).astype(x.dtype)
    if epilogue == "swiglu":
        gate, up = jnp.split(flat, 2, axis=-1)
        out = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up
        return out.reshape(*x.shape[:-1], *w.shape[2:])
    out = flat.reshape(*x.shape[:-1], *w.shape[1:])
    return out if residual is None else residual + out

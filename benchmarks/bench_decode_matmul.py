"""The projections of one decode or verify step, fused (`pallas_kernels.decode_matmul`)
against XLA op by op (the model's other path: RMSNorm, matmul, residual add or SwiGLU as
`model.linear` runs them), per layer shape, in microseconds and as a fraction of the copy
bandwidth for the weight bytes.

Shapes: the TinyLlama-1.1B draft and the Llama-2-7B verifier, each of a layer's four
matmuls (QKV with the input RMSNorm, output with the residual, gate/up with the RMSNorm and
SwiGLU, down with the residual), at 1 and 5 rows. Each call reads a different weight set of
several rotated through (`_timing.loop_time`, together larger than L2), so no weight is
found in cache; both paths pay the same loop's perturb and checksum. The kernel runs at its
default tiling and at each of `--tilings`; the fastest is marked.

    python benchmarks/bench_decode_matmul.py --out decode_matmul.json [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import _timing
import jax
import jax.numpy as jnp
from bench_generate import LLAMA2_7B, TINYLLAMA_1B, shrunk

import pallas_kernels.decode_matmul as dm
from specattn_jax.model import linear, projection_shapes, rms_norm

_L2_BYTES = 64 << 20


# Each projection's (epilogue, whether an RMSNorm comes first), as the model fuses them.
_FUSED = {
    "qkv": (None, True),
    "o": ("residual", False),
    "gate_up": ("swiglu", True),
    "down": ("residual", False),
}


def layer_matmuls(config) -> list[tuple[str, int, int, str | None, bool]]:
    """A layer's projections: (name, K, N, epilogue, whether an RMSNorm comes first)."""
    return [(name, k, n, *_FUSED[name]) for name, (k, n) in projection_shapes(config).items()]


def xla_path(x, w, norm_weight=None, residual=None, *, epilogue, eps):
    """The model's XLA ops for one projection (`model.linear`, with its doubled decode row)."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    if epilogue == "swiglu":
        gate_up = linear("bte,euf->btuf", x, w)
        return jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    out = linear("bte,ef->btf", x, w)
    return out if residual is None else residual + out


def time_matmul(rows, k_dim, n_dim, epilogue, norm, weights, keys, tilings, copy, args) -> dict:
    """Microseconds of one projection of `rows` rows, XLA's path and the kernel's tilings,
    each call on the next of `weights`."""
    eps = 1e-5
    weight_bytes = weights[0].size * weights[0].dtype.itemsize
    x = jax.random.normal(keys[0], (1, rows, k_dim)).astype(jnp.bfloat16)
    residual = None
    if epilogue == "residual":
        residual = jax.random.normal(keys[1], (1, rows, n_dim)).astype(jnp.bfloat16)
    norm_weight = jnp.ones((k_dim,), jnp.bfloat16) if norm else None
    sets = [(x, w) for w in weights]
    iters = 1 if args.tiny else max(5, int(2e-2 / (weight_bytes / 3e12 + 5e-6)) // len(sets))

    def seconds(fn):
        return _timing.loop_time(fn, sets, iters=iters, reps=1 if args.tiny else 5)["median_s"]

    row = {"rows": rows, "K": k_dim, "N": n_dim, "weight_bytes": weight_bytes}
    row["xla_us"] = 1e6 * seconds(
        lambda x, w: xla_path(x, w, norm_weight, residual, epilogue=epilogue, eps=eps)
    )
    fused = dict(norm_weight=norm_weight, eps=eps if norm else None, residual=residual,
                 epilogue=epilogue, interpret=jax.devices()[0].platform != "gpu")  # fmt: skip
    default = dm.BlockSizes.get_default(k_dim, n_dim)
    kernel_us = {}
    for block_n, block_k in [(default.block_n, default.block_k), *tilings]:
        label = f"{block_n}x{block_k}"
        if label in kernel_us or k_dim % block_k or n_dim % block_n:
            continue
        sizes = dataclasses.replace(default, block_n=block_n, block_k=block_k)
        kernel_us[label] = 1e6 * seconds(
            lambda x, w, sizes=sizes: dm.decode_matmul(x, w, block_sizes=sizes, **fused)
        )
    row.update(
        kernel_default=f"{default.block_n}x{default.block_k}",
        kernel_us=kernel_us,
        kernel_best=min(kernel_us, key=kernel_us.get),
    )
    timed = {"xla": row["xla_us"], "kernel": kernel_us[row["kernel_default"]],
             "best": kernel_us[row["kernel_best"]]}  # fmt: skip
    for path, us in timed.items():
        row[f"{path}_of_copy"] = weight_bytes / (us * 1e-6) / copy["ceiling_Bps"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="decode_matmul.json")
    parser.add_argument("--rows", default="1,5")
    parser.add_argument(
        "--tilings", default="16x256,32x256,64x256,32x128,64x128",
        help="block_n x block_k tilings to time beside the default",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="toy shapes: a CPU smoke run")
    args = parser.parse_args(argv)
    shape = shrunk if args.tiny else (lambda config: config)
    copy = {"ceiling_Bps": 1e10} if args.tiny else _timing.copy_bandwidth(1 << 30)
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "copy": copy, "rows": []}  # fmt: skip
    tilings = [tuple(map(int, t.split("x"))) for t in args.tilings.split(",") if t]
    for model_name, config in (("tinyllama_1b", TINYLLAMA_1B), ("llama2_7b", LLAMA2_7B)):
        config = shape(config)
        for name, k_dim, n_dim, epilogue, norm in layer_matmuls(config):
            w_shape = (k_dim, 2, n_dim) if epilogue == "swiglu" else (k_dim, n_dim)
            weight_bytes = 2 * k_dim * n_dim * (2 if epilogue == "swiglu" else 1)
            num_sets = max(2, min(16, -(-4 * _L2_BYTES // weight_bytes)))
            keys = jax.random.split(jax.random.key(k_dim * n_dim), num_sets + 3)
            weights = [
                (0.02 * jax.random.normal(k, w_shape)).astype(jnp.bfloat16) for k in keys[3:]
            ]
            for rows in [int(r) for r in args.rows.split(",")]:
                row = time_matmul(
                    rows, k_dim, n_dim, epilogue, norm, weights, keys, tilings, copy, args
                )
                row.update(model=model_name, matmul=name, weight_sets=num_sets)
                report["rows"].append(row)
                kernel_us = row["kernel_us"]
                print(
                    f"{model_name:13} {name:8} rows {rows:2}  xla {row['xla_us']:7.1f} us "
                    f"({row['xla_of_copy']:.2f})  kernel {row['kernel_default']} "
                    f"{kernel_us[row['kernel_default']]:7.1f} ({row['kernel_of_copy']:.2f})  best "
                    f"{row['kernel_best']} {kernel_us[row['kernel_best']]:7.1f} "
                    f"({row['best_of_copy']:.2f})",
                    flush=True,
                )
                Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

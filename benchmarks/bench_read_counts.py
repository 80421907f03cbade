"""What counting the loaded KV rows costs the verify kernel: `sparse_verify_attention` with
and without `return_reads`, dense and sparse, on Llama-3-8B-shaped attention (32/8 heads,
D 128, bf16, batch 1, Q = 5 new tokens), device-timed in one jit (`_timing.loop_time`).

    python benchmarks/bench_read_counts.py --out runs/read_counts.json

Prints a table and writes JSON; never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import warnings

import _timing  # this folder's helper: benchmarks run as scripts
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

HEADS, KV_HEADS, HEAD_DIM, QUERIES = 32, 8, 128, 5


def _inputs(context: int, kept: float, granularity: int, seed: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    size = context + QUERIES
    q = jax.random.normal(keys[0], (1, QUERIES, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, size, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, size, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    blocks = -(-context // granularity)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(blocks, max(1, int(kept * blocks)), replace=False))
    indices = np.zeros((1, -(-size // granularity)), np.int32)
    indices[0, : len(chosen)] = chosen
    lengths = jnp.array([context], jnp.int32)
    return q, k, v, jnp.asarray(indices), jnp.array([len(chosen)], jnp.int32), lengths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
    rows = []
    for context in map(int, args.contexts.split(",")):
        for name, kept, granularity in (("dense", 1.0, 64), ("sparse 0.3", 0.3, 16)):
            arg_sets = [_inputs(context, kept, granularity, seed) for seed in range(2)]
            timed = {}
            for return_reads in (False, True):
                fn = lambda q, k, v, i, c, n, rr=return_reads, g=granularity: (  # noqa: E731
                    pk.sparse_verify_attention(q, k, v, i, c, n, granularity=g, return_reads=rr)
                )
                timed[return_reads] = _timing.loop_time(fn, arg_sets, iters=args.iters)
            rows.append(
                {
                    "context": context,
                    "kind": name,
                    "granularity": granularity,
                    "without_counts_us": timed[False]["median_s"] * 1e6,
                    "with_counts_us": timed[True]["median_s"] * 1e6,
                    "timings": {str(k): v for k, v in timed.items()},
                }
            )
            row = rows[-1]
            print(
                f"{context:>7} {name:<11} g={granularity:<3}"
                f" without {row['without_counts_us']:8.1f} us"
                f"  with {row['with_counts_us']:8.1f} us"
                f"  ratio {row['with_counts_us'] / row['without_counts_us']:.3f}",
                flush=True,
            )
    report = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""Verify-step latency and tokens/s of a Llama-2-7B-shaped verifier on one and on several GPUs
(tensor parallel over "model", KV cache split by KV head), dense and SpecAttn-sparse, at long
contexts. Prints a table and writes JSON.

Random bf16 weights; caches filled with random keys and values to the context. The sparse
verify reads a random `--kept` fraction of each sparse layer's context blocks (default 0.49,
what p = 0.97 kept on the bundled pair, `bench_generate_h200.json`). The draft (TinyLlama-
1.1B-shaped) is replicated, so its time does not shrink with more GPUs; tokens/s divides
`--tokens-per-step` (default 2.34, SpecAttn's on the bundled pair; the dense row uses
`--dense-tokens-per-step`, default 2.01) by draft + select + verify. The target: the
model=2 verify step within 1.3x of half the model=1 step.

    python benchmarks/bench_sharded.py --meshes "model=1;model=2" --contexts 32768,131072
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/bench_sharded.py --tiny
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_generate import LLAMA2_7B, TINYLLAMA_1B, shrunk, step_times  # this folder's script
from flax import nnx

from specattn_jax import sharding
from specattn_jax.model import Llama


def bench_mesh(spec: str, args, verifier_config, draft_config) -> list[dict]:
    mesh = sharding.make_mesh(spec)
    verifier = sharding.shard_model(
        Llama(verifier_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), mesh
    )
    draft = sharding.replicate_model(
        Llama(draft_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)), mesh
    )
    v_graph, v_params = nnx.split(verifier)
    d_graph, d_params = nnx.split(draft)
    size = max(args.contexts) + 64
    rows = []
    for context in args.contexts:
        times = step_times(
            (v_graph, v_params, verifier_config), (d_graph, d_params, draft_config),
            context, size, args.kept, args,
            place=lambda cache, tensor_parallel: sharding.shard_cache(cache, mesh, tensor_parallel),
            verifier_attend=sharding.attention_for(mesh),
        )  # fmt: skip
        dense_step = times["draft"] + times["verify_dense"]
        sparse_step = times["draft_summaries"] + times["select"] + times["verify_sparse"]
        rows.append(
            {
                "mesh": spec,
                "devices": mesh.devices.size,
                "context": context,
                **{f"{name}_ms": 1e3 * seconds for name, seconds in times.items()},
                "tokens_per_s": {
                    "autoregressive": 1 / times["decode"],
                    "speculative": args.dense_tokens_per_step / dense_step,
                    "specattn": args.tokens_per_step / sparse_step,
                },
            }
        )
        print(f"  {spec} {context}: {rows[-1]}", file=sys.stderr)
    return rows


def scaling(rows: list[dict]) -> list[dict]:
    """For every multi-device row: its verify step over half (1/N of) the one-device step."""
    single = {r["context"]: r for r in rows if r["devices"] == 1}
    out = []
    for row in rows:
        base = single.get(row["context"])
        if row["devices"] == 1 or base is None:
            continue
        out.append(
            {
                "mesh": row["mesh"],
                "context": row["context"],
                **{
                    f"{name}_vs_ideal": row[f"{name}_ms"] / (base[f"{name}_ms"] / row["devices"])
                    for name in ("verify_dense", "verify_sparse")
                },
            }
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_sharded.json")
    parser.add_argument(
        "--meshes", default="model=1;model=2", type=lambda s: s.split(";"),
        help="mesh specs separated by ';' (a spec may hold commas: data=2,model=2)",
    )  # fmt: skip
    parser.add_argument(
        "--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 131072]
    )
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--granularity", type=int, default=16)
    parser.add_argument("--kept", type=float, default=0.49)
    parser.add_argument("--attn-p", type=float, default=0.97, help="for the select step")
    parser.add_argument("--tokens-per-step", type=float, default=2.34)
    parser.add_argument("--dense-tokens-per-step", type=float, default=2.01)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="toy model sizes (CPU smoke run)")
    args = parser.parse_args(argv)
    verifier_config, draft_config = LLAMA2_7B, TINYLLAMA_1B
    if args.tiny:
        verifier_config, draft_config = shrunk(LLAMA2_7B), shrunk(TINYLLAMA_1B)
    rows = []
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": rows}
    for spec in args.meshes:
        rows.extend(bench_mesh(spec, args, verifier_config, draft_config))
        report["scaling"] = scaling(rows)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {report['device']} x {len(jax.devices())}, jax {report['jax']}")
    print(
        "| mesh | context | dense verify ms | sparse verify ms | draft ms | "
        "draft + summaries ms | select ms | "
        "AR tok/s | speculative tok/s | SpecAttn tok/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        tps = r["tokens_per_s"]
        print(
            f"| {r['mesh']} | {r['context']} | {r['verify_dense_ms']:.2f} | "
            f"{r['verify_sparse_ms']:.2f} | {r['draft_ms']:.2f} | "
            f"{r['draft_summaries_ms']:.2f} | {r['select_ms']:.3f} | "
            f"{tps['autoregressive']:.1f} | {tps['speculative']:.1f} | {tps['specattn']:.1f} |"
        )
    for s in report["scaling"]:
        print(
            f"{s['mesh']} at {s['context']}: verify step / (one-GPU step / N) = "
            f"{s['verify_dense_vs_ideal']:.2f} dense, "
            f"{s['verify_sparse_vs_ideal']:.2f} sparse (target <= 1.3)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import (  # noqa: E402
    LLAMA2_7B,
    TINYLLAMA_1B,
    _decode_step,
    _draft_step,
    _random_cache,
    _random_plan,
    _select_step,
    _shrunk,
    _verify_step,
    device_time,
)
from specattn_jax import sharding  # noqa: E402
from specattn_jax.model import Llama  # noqa: E402
from specattn_jax.selection import SpecAttnSelector  # noqa: E402


def _sharded_random_cache(config, size, context, key, mesh, head_parallel):
    """`_random_cache`, generated eagerly (one jitted program generating every layer's
    gigabytes of random values compiled for minutes on an H200), then placed on `mesh`."""
    cache = _random_cache(config, 1, size, context, key)
    return sharding.shard_cache(cache, mesh, head_parallel)


def _times_at(context, size, mesh, verifier, draft, selector, args) -> dict[str, float]:
    """Median device seconds of the verify (dense, sparse), decode, draft and select steps
    with `context` tokens in caches of `size` positions, on `mesh`."""
    (v_graph, v_params, verifier_config), (d_graph, d_params, draft_config) = verifier, draft
    key = jax.random.key(context)
    tokens = jax.random.randint(key, (1, args.gamma + 1), 0, draft_config.vocab_size)
    lengths = jnp.full((1,), context, jnp.int32)
    num_layers = verifier_config.num_hidden_layers
    plan = _random_plan(verifier_config, 1, size, context, args.kept, args.granularity, 2, key)
    state = (_sharded_random_cache(verifier_config, size, context, key, mesh, True), None)
    times = {}
    for name, step_plan in (("verify_dense", None), ("verify_sparse", plan)):
        times[name], state = device_time(
            lambda s, p=step_plan: _verify_step(v_graph, v_params, tokens, s[0], lengths, p),
            state,
            calls=args.calls,
        )
    times["decode"], state = device_time(
        lambda s: _decode_step(v_graph, v_params, tokens, s[0], lengths), state, calls=args.calls
    )
    del state
    draft_state = (_sharded_random_cache(draft_config, size, context, key, mesh, False), None)
    times["draft"], draft_state = device_time(
        lambda s: _draft_step(d_graph, d_params, tokens, s[0], lengths, key, args.gamma),
        draft_state,
        calls=args.calls,
    )
    times["select"], _ = device_time(
        lambda s: _select_step(selector, s[0], lengths, num_layers, size),
        (draft_state[1], None),
        calls=args.calls,
    )
    return times


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
    num_layers = verifier_config.num_hidden_layers
    selector = SpecAttnSelector(
        attn_p=jnp.float32(0.97),
        mapping=tuple(j * draft_config.num_hidden_layers // num_layers for j in range(num_layers)),
        granularity=args.granularity,
    )
    rows = []
    for context in args.contexts:
        times = _times_at(
            context, size, mesh, (v_graph, v_params, verifier_config),
            (d_graph, d_params, draft_config), selector, args,
        )  # fmt: skip
        dense_step = times["draft"] + times["verify_dense"]
        sparse_step = times["draft"] + times["select"] + times["verify_sparse"]
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
    parser.add_argument("--tokens-per-step", type=float, default=2.34)
    parser.add_argument("--dense-tokens-per-step", type=float, default=2.01)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="toy model sizes (CPU smoke run)")
    args = parser.parse_args(argv)
    verifier_config, draft_config = LLAMA2_7B, TINYLLAMA_1B
    if args.tiny:
        verifier_config, draft_config = _shrunk(LLAMA2_7B), _shrunk(TINYLLAMA_1B)
    rows = []
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": rows}
    for spec in args.meshes:
        rows.extend(bench_mesh(spec, args, verifier_config, draft_config))
        report["scaling"] = scaling(rows)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {report['device']} x {len(jax.devices())}, jax {report['jax']}")
    print(
        "| mesh | context | dense verify ms | sparse verify ms | draft ms | select ms | "
        "AR tok/s | speculative tok/s | SpecAttn tok/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        tps = r["tokens_per_s"]
        print(
            f"| {r['mesh']} | {r['context']} | {r['verify_dense_ms']:.2f} | "
            f"{r['verify_sparse_ms']:.2f} | {r['draft_ms']:.2f} | {r['select_ms']:.3f} | "
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

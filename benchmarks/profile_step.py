"""Where a decode step's time goes: a profiler trace of the draft phase (TinyLlama-1.1B
shape) and of one autoregressive step (Llama-2-7B shape), summarised per GPU kernel.

Random bf16 weights and caches of random keys (bench_generate.py's steps): the kernels and
bytes are those of a real run; only the values differ. For each step, after a warm-up,
`--steps` calls run under `jax.profiler.trace`; the trace's GPU kernels are grouped by name
(microseconds and launches per step) beside the wall time per step, so
the gap between them (launch and host overhead) shows too.

    python benchmarks/profile_step.py --out profile.json [--trace-dir DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_generate import (
    LLAMA2_7B,
    TINYLLAMA_1B,
    _decode_step,
    _draft_step,
    _random_cache,
    shrunk,
)
from flax import nnx

from specattn_jax.attention import attend
from specattn_jax.model import Llama
from specattn_jax.selection import SpecAttnSelector


def kernel_summary(trace_dir: Path, steps: int, top: int) -> dict:
    """GPU kernel time per step from the newest `*.trace.json.gz` under `trace_dir`."""
    trace_file = max(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    process_names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    thread_names = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    lines: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") != "X" or "GPU" not in process_names.get(e["pid"], ""):
            continue
        line = thread_names.get((e["pid"], e["tid"]), str(e["tid"]))
        lines[line][e["name"]] += e.get("dur", 0.0)
        counts[line][e["name"]] += 1
    summary = {}
    for line, durations in lines.items():
        summary[line] = {
            "total_us_per_step": sum(durations.values()) / steps,
            "launches_per_step": sum(counts[line].values()) / steps,
            "top": [
                {
                    "name": name[:160],
                    "us_per_step": total / steps,
                    "launches_per_step": counts[line][name] / steps,
                }
                for name, total in durations.most_common(top)
            ],
        }
    return summary


def profile(name: str, step, state, args, report: dict):
    """Traces `state = step(state)` and adds its summary to `report`; returns the state
    (donated buffers move on with it)."""
    state = jax.block_until_ready(step(state))  # compile and warm up
    state = jax.block_until_ready(step(state))
    trace_dir = Path(args.trace_dir or tempfile.mkdtemp()) / name
    with jax.profiler.trace(str(trace_dir)):
        start = time.perf_counter()
        for _ in range(args.steps):
            state = step(state)
        jax.block_until_ready(state)
        wall = (time.perf_counter() - start) / args.steps
    row = {"wall_ms_per_step": 1e3 * wall}
    try:
        row["gpu"] = kernel_summary(trace_dir, args.steps, args.top)
    except (ValueError, OSError, KeyError) as error:
        row["trace_error"] = f"{type(error).__name__}: {error}"
    report[name] = row
    print(f"\n== {name}: {row['wall_ms_per_step']:.3f} ms per step (wall, traced)")
    for line, part in row.get("gpu", {}).items():
        print(
            f"  [{line}] {part['total_us_per_step']:.1f} us/step in "
            f"{part['launches_per_step']:.0f} launches"
        )
        for k in part["top"][: args.print_top]:
            print(
                f"    {k['us_per_step']:9.1f} us  x{k['launches_per_step']:<5.0f} {k['name'][:90]}"
            )
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile_step.json")
    parser.add_argument("--trace-dir", help="keep the raw traces here")
    parser.add_argument("--draft-context", type=int, default=32768)
    parser.add_argument("--decode-contexts", default="4096,32768")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--print-top", type=int, default=12)
    parser.add_argument("--tiny", action="store_true", help="toy shapes: a CPU smoke run")
    args = parser.parse_args(argv)
    shape = shrunk if args.tiny else (lambda config: config)
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    decode_contexts = [int(c) for c in args.decode_contexts.split(",") if c]
    size = max([args.draft_context, *decode_contexts]) + 64
    key = jax.random.key(0)

    draft_config, verifier_config = shape(TINYLLAMA_1B), shape(LLAMA2_7B)
    d_graph, d_params = nnx.split(Llama(draft_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))
    tokens = jax.random.randint(key, (1, args.gamma + 1), 0, draft_config.vocab_size)
    lengths = jnp.full((1,), args.draft_context, jnp.int32)
    num_layers = verifier_config.num_hidden_layers
    selector = SpecAttnSelector(
        attn_p=jnp.float32(0.97),
        mapping=tuple(j * draft_config.num_hidden_layers // num_layers for j in range(num_layers)),
        granularity=16,
    )
    draft_state = (_random_cache(draft_config, 1, size, args.draft_context, key), None)
    for name, layers in (("draft", ()), ("draft_summaries", selector.draft_layers)):
        draft_state = profile(
            f"{name}_{args.draft_context}",
            lambda state, layers=layers: _draft_step(
                d_graph, d_params, tokens, state[0], lengths, key, args.gamma, layers
            ),
            draft_state,
            args,
            report,
        )
    del draft_state

    v_graph, v_params = nnx.split(Llama(verifier_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    cache = _random_cache(verifier_config, 1, size, max(decode_contexts, default=0), key)
    state = (cache, None)
    for context in decode_contexts:
        context_lengths = jnp.full((1,), context, jnp.int32)
        state = profile(
            f"decode_{context}",
            lambda state, lengths=context_lengths: _decode_step(
                v_graph, v_params, tokens, state[0], lengths, attend
            ),
            state,
            args,
            report,
        )
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

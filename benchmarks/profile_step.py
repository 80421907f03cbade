"""Where a decode step's time goes: a profiler trace of the draft phase (TinyLlama-1.1B
shape), of one autoregressive step (Llama-2-7B shape) and of a step of `generate`'s decode
loop (the same, autoregressive), summarised per GPU kernel.

Random bf16 weights and caches of random keys (bench_generate.py's steps): the kernels and
bytes are those of a real run; only the values differ. For each step, after a warm-up,
`--steps` calls run under `jax.profiler.trace`; the trace's GPU kernels are grouped by name
(microseconds and launches per step) beside the wall time per step, and the GPU's idle time
between kernels is summed by the kernel it waited for (launch and host overhead, and syncs).
Each kernel is named with the source op its fusion came from (the HLO metadata's `op_name`,
which holds the model's named scopes: qkv, rope, cache_update, attention, ...).

    python benchmarks/profile_step.py --out profile.json [--trace-dir DIR] [--hlo-dir DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
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
from specattn_jax.model import MATMUL_MODES, Llama
from specattn_jax.selection import SpecAttnSelector
from specattn_jax.speculative import SpecConfig, _jit_prefill, _setup, decode_loop

_HLO_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"')


def source_ops(compiled_hlo: str) -> dict[str, str]:
    """{kernel name: op_name} for a compiled module's instructions (a kernel is named after
    its fusion or custom call, with '.' and '-' as '_')."""
    ops = {}
    for line in compiled_hlo.splitlines():
        match = _HLO_INSTRUCTION.match(line)
        if match:
            ops[re.sub(r"[.\-]", "_", match.group(1))] = match.group(2)
    return ops


def kernel_summary(trace_dir: Path, steps: int, top: int, ops: dict[str, str]) -> dict:
    """GPU kernel time per step from the newest `*.trace.json.gz` under `trace_dir`, and the
    GPU's idle time between them: per step, and summed by the kernel the GPU waited for (a
    wait before a kernel is time the host took to launch it, or a sync before it)."""
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
    kernels: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "GPU" not in process_names.get(e["pid"], ""):
            continue
        line = thread_names.get((e["pid"], e["tid"]), str(e["tid"]))
        kernels[line].append((e["ts"], e.get("dur", 0.0), e["name"]))
    summary = {}
    for line, timeline in kernels.items():
        timeline.sort()
        durations, counts = collections.Counter(), collections.Counter()
        waits, wait_counts = collections.Counter(), collections.Counter()
        busy_until = timeline[0][0]
        for start, duration, name in timeline:
            durations[name] += duration
            counts[name] += 1
            if start > busy_until:
                waits[name] += start - busy_until
                wait_counts[name] += 1
            busy_until = max(busy_until, start + duration)
        summary[line] = {
            "total_us_per_step": sum(durations.values()) / steps,
            "launches_per_step": sum(counts.values()) / steps,
            "idle_us_per_step": sum(waits.values()) / steps,
            "top": _ranked(durations, counts, "launches_per_step", steps, top, ops),
            "top_waits": _ranked(waits, wait_counts, "waits_per_step", steps, top, ops),
        }
    return summary


def _ranked(
    times: collections.Counter, counts: collections.Counter, count_key: str, steps: int,
    top: int, ops: dict[str, str],
) -> list[dict]:  # fmt: skip
    """The `top` kernels by time, each with its source op and its time and count per step."""
    return [
        {
            "name": name[:160],
            "op": ops.get(name, "")[-160:],
            "us_per_step": total / steps,
            count_key: counts[name] / steps,
        }
        for name, total in times.most_common(top)
    ]


def profile(
    name: str, phase, inputs, state, args, report: dict, *, iterations: int = 1,
    calls: int | None = None,
):  # fmt: skip
    """Traces `calls` (default --steps) calls of `state = phase(inputs, state)`, jitted with
    the state donated, and adds its summary to `report`; returns the state (donated buffers
    move on with it). A call that runs a loop of `iterations` steps is reported per step.
    Its kernels outside the loop count too: keep them few (the summary cannot tell them
    apart, as a kernel's op name often lacks the loop's scope)."""
    calls = calls or args.steps
    step = jax.jit(phase, donate_argnums=1)
    compiled_hlo = step.lower(inputs, state).compile().as_text()
    ops = source_ops(compiled_hlo)
    if args.hlo_dir:
        Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.hlo_dir) / f"{name}.hlo.txt").write_text(compiled_hlo)
    state = jax.block_until_ready(step(inputs, state))  # compile and warm up
    state = jax.block_until_ready(step(inputs, state))
    trace_dir = Path(args.trace_dir or tempfile.mkdtemp()) / name
    with jax.profiler.trace(str(trace_dir)):
        start = time.perf_counter()
        for _ in range(calls):
            state = step(inputs, state)
        jax.block_until_ready(state)
        wall = (time.perf_counter() - start) / calls
    row = {"wall_ms_per_call": 1e3 * wall, "steps_per_call": iterations}
    try:
        row["gpu"] = kernel_summary(trace_dir, calls * iterations, args.top, ops)
    except (ValueError, OSError, KeyError) as error:
        row["trace_error"] = f"{type(error).__name__}: {error}"
    report[name] = row
    print(f"\n== {name}: {row['wall_ms_per_call']:.3f} ms per call of {iterations} steps (wall)")
    for line, part in row.get("gpu", {}).items():
        print(
            f"  [{line}] {part['total_us_per_step']:.1f} us/step in "
            f"{part['launches_per_step']:.0f} launches, idle {part['idle_us_per_step']:.1f} us"
        )
        for k in part["top"][: args.print_top]:
            print(
                f"    {k['us_per_step']:9.1f} us  x{k['launches_per_step']:<5.0f} "
                f"{k['name'][:50]:50} {k['op'][-70:]}"
            )
        print("  idle before:")
        for k in part["top_waits"][: args.print_top // 2]:
            print(
                f"    {k['us_per_step']:9.1f} us  x{k['waits_per_step']:<5.1f} "
                f"{k['name'][:50]:50} {k['op'][-70:]}"
            )
    return state


def profile_draft(draft_config, verifier_config, tokens, size: int, key, args, report: dict):
    """The draft phase (gamma tokens at --draft-context), without and with the attention
    summaries a 7B verifier's layer map asks of every draft layer."""
    d_graph, d_params = nnx.split(
        Llama(draft_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1), matmul_mode=args.matmul_mode)
    )
    lengths = jnp.full((1,), args.draft_context, jnp.int32)
    num_layers = verifier_config.num_hidden_layers
    selector = SpecAttnSelector(
        attn_p=jnp.float32(0.97),
        mapping=tuple(j * draft_config.num_hidden_layers // num_layers for j in range(num_layers)),
        granularity=16,
    )
    state = (_random_cache(draft_config, 1, size, args.draft_context, key), None)
    for name, layers in (("draft", ()), ("draft_summaries", selector.draft_layers)):
        state = profile(
            f"{name}_{args.draft_context}",
            lambda inputs, state, layers=layers: _draft_step(
                d_graph, *inputs[:2], state[0], *inputs[2:], args.gamma, layers
            ),
            (d_params, tokens, lengths, key),
            state,
            args,
            report,
        )


def profile_decode(
    v_graph, v_params, config, tokens, contexts: list[int], size: int, key, args, report: dict
):
    """One autoregressive step of the verifier (`config`) at each context, over one cache of
    random keys."""
    state = (_random_cache(config, 1, size, max(contexts), key), None)
    for context in contexts:
        context_lengths = jnp.full((1,), context, jnp.int32)
        state = profile(
            f"decode_{context}",
            lambda inputs, state: _decode_step(v_graph, *inputs[:2], state[0], inputs[2], attend),
            (v_params, tokens, context_lengths),
            state,
            args,
            report,
        )


def profile_generate(graphdef, params, args) -> dict:
    """The kernels of a step of `generate`'s decode loop, autoregressive (Llama-2-7B shape, a
    random prompt of --generate-context tokens, --generate-tokens new tokens), traced as the
    loop alone from one prefilled state (so every kernel in the trace is the loop's): what the
    loop runs beyond the decode forward shows beside `decode_*`."""
    verifier = nnx.merge(graphdef, params)
    prompt = jax.random.randint(
        jax.random.key(1), (args.generate_context,), 0, verifier.config.vocab_size
    ).tolist()
    run = _setup(None, verifier, [prompt], SpecConfig(), args.generate_tokens, *[None] * 5)
    prefilled = _jit_prefill(*run.prefill_args)
    initial = dataclasses.replace(prefilled, caches=None)  # each call starts from it

    def phase(inputs, caches):
        params, initial = inputs
        final = decode_loop(
            run.decoder, params, run.rule, run.selector,
            dataclasses.replace(initial, caches=caches), run.max_new,
        )  # fmt: skip
        return final.caches

    report = {}
    profile(
        f"generate_ar_{args.generate_context}", phase, (run.params, initial),
        prefilled.caches, args, report, iterations=args.generate_tokens - 1,
        calls=2,  # each call is a whole loop: tens of thousands of kernels in the trace
    )  # fmt: skip
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile_step.json")
    parser.add_argument("--trace-dir", help="keep the raw traces here")
    parser.add_argument("--hlo-dir", help="write each step's compiled HLO here")
    parser.add_argument("--draft-context", type=int, default=32768, help="0: skip")
    parser.add_argument("--decode-contexts", default="4096,32768")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--generate-context", type=int, default=4096, help="0: skip")
    parser.add_argument("--generate-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--print-top", type=int, default=12)
    parser.add_argument(
        "--matmul-mode", default="xla", choices=MATMUL_MODES,
        help="how steps multiply: XLA (the model's default) or the fused decode_matmul kernels",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="toy shapes: a CPU smoke run")
    args = parser.parse_args(argv)
    shape = shrunk if args.tiny else (lambda config: config)
    report = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "matmul_mode": args.matmul_mode,
    }
    decode_contexts = [int(c) for c in args.decode_contexts.split(",") if c]
    size = max([args.draft_context, *decode_contexts]) + 64
    key = jax.random.key(0)

    draft_config, verifier_config = shape(TINYLLAMA_1B), shape(LLAMA2_7B)
    tokens = jax.random.randint(key, (1, args.gamma + 1), 0, draft_config.vocab_size)
    if args.draft_context:
        profile_draft(draft_config, verifier_config, tokens, size, key, args, report)
    if decode_contexts or args.generate_context:
        v_graph, v_params = nnx.split(
            Llama(
                verifier_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), matmul_mode=args.matmul_mode
            )
        )
        if decode_contexts:
            profile_decode(
                v_graph, v_params, verifier_config, tokens, decode_contexts, size, key, args,
                report,
            )  # fmt: skip
        if args.generate_context:
            report.update(profile_generate(v_graph, v_params, args))
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

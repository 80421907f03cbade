"""What running inside a device loop costs a draft phase and a decode step.

`generate` runs every step in one `lax.while_loop`, and the draft's gamma - 1 single-token
forwards in a `lax.scan`. On a GPU, XLA launches each iteration's kernels from the host and
reads the loop predicate back before the next, so small kernels can leave the GPU waiting.
This script times, with random bf16 weights and caches of random keys (bench_generate's
steps):

  draft   a draft phase (TinyLlama-1.1B shape, gamma tokens at --context), without and
          with the attention summaries of every draft layer (SpecAttn's draft);
  decode  an autoregressive step (Llama-2-7B shape at each --decode-contexts), fed its own
          greedy token;

(bench_generate's `_draft_step` and `_decode_step`) each as `call` (one jitted call per
phase, back to back, one sync) and `loop` (--loop phases in one `lax.fori_loop`, as
`generate` runs them), in milliseconds per phase. Run it under different XLA_FLAGS to see
what CUDA graphs of loop bodies change (device_session.sh runs the default and
`--xla_gpu_enable_command_buffer` with WHILE and CONDITIONAL).

    python benchmarks/bench_step_loop.py --out loop.json [--tiny]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import _timing
import jax
import jax.numpy as jnp
from bench_generate import (
    LLAMA2_7B,
    TINYLLAMA_1B,
    _decode_step,
    _draft_step,
    _random_cache,
    device_time,
    shrunk,
)
from flax import nnx

from specattn_jax.attention import attend
from specattn_jax.model import MATMUL_MODES, Llama


def _draft_phase(graphdef, gamma, summary_layers, params, tokens, lengths, key, state):
    """A draft phase. The state is the cache, or with `summary_layers` (the cache, the last
    phase's summaries [gamma, L, B, S]): carried, the summaries are live in a loop."""
    cache = state[0] if summary_layers else state
    cache, summaries = _draft_step(
        graphdef, params, tokens, cache, lengths, key, gamma, summary_layers
    )
    return (cache, summaries) if summary_layers else cache


def _decode(graphdef, params, lengths, state):
    """One decode step fed its own greedy token, so that no part of the forward is dead
    code (a step whose logits went unused would skip the LM head and the last layer's
    attention read and MLP)."""
    cache, tokens = state
    cache, logits = _decode_step(graphdef, params, tokens, cache, lengths, attend)
    return cache, jnp.argmax(logits[:, -1:], axis=-1).astype(tokens.dtype)


def call_ms(phase, args: tuple, state, calls: int):
    """Median milliseconds per `state = phase(*args, state)` as back-to-back jitted calls
    (weights are arguments, never constants; the state, caches included, is donated)."""
    step = jax.jit(lambda args, state: phase(*args, state), donate_argnums=1)
    seconds, state = device_time(lambda state: (step(args, state[0]), None), (state, None),
                                 calls=calls)  # fmt: skip
    return 1e3 * seconds, state[0]


def loop_ms(phase, args: tuple, state, count: int):
    """Median milliseconds per phase of `count` phases in one `fori_loop`."""
    summary, state = _timing.threaded_loop_time(phase, args, state, iters=count)
    return 1e3 * summary["median_s"], state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="step_loop.json")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--decode-contexts", default="4096,32768")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--loop", type=int, default=20, help="phases per device loop")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument(
        "--matmul-mode", default="xla", choices=MATMUL_MODES,
        help="how steps multiply: XLA (the model's default) or the fused decode_matmul kernels",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="toy shapes: a CPU smoke run")
    args = parser.parse_args(argv)
    shape = shrunk if args.tiny else (lambda config: config)
    decode_contexts = [int(c) for c in args.decode_contexts.split(",") if c]
    size = max([args.context, *decode_contexts]) + 64
    key = jax.random.key(0)
    report = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_mode": args.matmul_mode,
        "gamma": args.gamma,
        "loop": args.loop,
        "rows": [],
    }

    def record(**row):
        report["rows"].append(row)
        print(json.dumps(row), flush=True)

    draft_config = shape(TINYLLAMA_1B)
    d_graph, d_params = nnx.split(
        Llama(draft_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1), matmul_mode=args.matmul_mode)
    )
    tokens = jax.random.randint(key, (1, args.gamma + 1), 0, draft_config.vocab_size)
    lengths = jnp.full((1,), args.context, jnp.int32)
    cache = _random_cache(draft_config, 1, size, args.context, key)
    phase_args = (d_params, tokens, lengths, key)
    every_layer = tuple(range(draft_config.num_hidden_layers))
    for step, layers in (("draft", ()), ("draft_summaries", every_layer)):
        phase = functools.partial(_draft_phase, d_graph, args.gamma, layers)
        state = cache
        if layers:
            _, summaries = jax.eval_shape(phase, *phase_args, (cache, None))
            state = (cache, jnp.zeros(summaries.shape, summaries.dtype))
        call, state = call_ms(phase, phase_args, state, args.calls)
        loop, state = loop_ms(phase, phase_args, state, args.loop)
        cache = state[0] if layers else state
        record(step=step, context=args.context, call_ms=call, loop_ms=loop)
    del cache, state

    verifier_config = shape(LLAMA2_7B)
    v_graph, v_params = nnx.split(
        Llama(verifier_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), matmul_mode=args.matmul_mode)
    )
    cache = _random_cache(verifier_config, 1, size, max(decode_contexts, default=0), key)
    state = (cache, tokens[:, :1])
    for context in decode_contexts:
        phase = functools.partial(_decode, v_graph)
        phase_args = (v_params, jnp.full((1,), context, jnp.int32))
        call, state = call_ms(phase, phase_args, state, args.calls)
        loop, state = loop_ms(phase, phase_args, state, args.loop)
        record(step="decode", context=context, call_ms=call, loop_ms=loop)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

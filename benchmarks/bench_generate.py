"""Tokens per second of autoregressive decoding, dense speculative decoding and SpecAttn.

Two parts, each printing a table and writing JSON:

(a) the bundled pair, real text: prompts from the test books, generation timed end to end
    (one jitted `generate` call per run, warm, median of several runs), with the acceptance
    rate, tokens per step and measured KV reduction;
(b) a Llama-2-7B-shaped verifier with a TinyLlama-1.1B-shaped draft, random bf16 weights, at
    long contexts (4K-32K) whose caches are filled with random keys and values. Random
    models make acceptance meaningless, so this part times one step split into draft /
    select / verify (device-timed: many back-to-back calls, one sync) and converts it to
    tokens/s with the mean accepted length measured in (a); the sparse verify reads the
    kept fraction measured in (a).

    python benchmarks/bench_generate.py --out results.json [--skip-bundled] [--skip-synthetic]
        [--bundled-from earlier.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from specattn_jax.acceptance import GreedyAcceptance
from specattn_jax.attention import AttentionPlan, attend
from specattn_jax.cache import KVCache
from specattn_jax.config import LlamaConfig
from specattn_jax.model import Llama
from specattn_jax.selection import SelectionInputs, SpecAttnSelector, sparse_layer_flags
from specattn_jax.speculative import SpecConfig, draft_tokens, generate

LLAMA2_7B = LlamaConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, head_dim=128, torch_dtype="bfloat16",
    max_position_embeddings=32768,
)  # fmt: skip
TINYLLAMA_1B = LlamaConfig(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, head_dim=64, torch_dtype="bfloat16",
    max_position_embeddings=32768,
)  # fmt: skip


def device_time(fn, state, *, calls: int = 10, repeats: int = 5):
    """Median seconds per call of `state = fn(state)`, timed as `calls` back-to-back
    dispatches and one sync (the state threads through, so donated buffers stay valid)."""
    state = jax.block_until_ready(fn(state))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            state = fn(state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times), state


# (a) The bundled pair.


def bench_bundled(args) -> dict:
    from specattn_jax.data import load_split_texts
    from specattn_jax.eval import make_windows
    from specattn_jax.layer_map import LayerMap, calibrate
    from specattn_jax.loading import ASSETS, load_pretrained

    dtype = jnp.dtype(args.dtype)
    verifier, tokenizer = load_pretrained("bundled:verifier", dtype)
    draft, _ = load_pretrained("bundled:draft", dtype)
    map_path = ASSETS / "layer_map.json"
    if map_path.is_file():
        layer_map = LayerMap.load(map_path)
    else:
        calibration = make_windows(tokenizer, load_split_texts("validation"), 512, 8)
        layer_map = calibrate(draft, verifier, calibration)
    prompts = make_windows(tokenizer, load_split_texts("test"), args.prompt_len, args.batch)
    prompts = [list(map(int, p)) for p in prompts]
    configs = {
        "autoregressive": None,
        "speculative": SpecConfig(gamma=args.gamma),
        "specattn": SpecConfig(
            gamma=args.gamma,
            attn_p=args.attn_p,
            layer_map=layer_map,
            granularity=args.granularity,
        ),
    }
    rows = {}
    for name, config in configs.items():
        run = lambda config=config: generate(  # noqa: E731
            None if config is None else draft,
            verifier,
            prompts,
            config,
            max_new_tokens=args.new_tokens,
            eos_id=None,
        )
        result = run()  # compile
        seconds = []
        for _ in range(args.runs):
            start = time.perf_counter()
            result = run()
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        tokens = sum(len(t) for t in result.tokens)
        stats = result.stats
        rows[name] = {
            "seconds": median,
            "seconds_all": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / median,
            "acceptance_rate": stats.get("acceptance_rate"),
            "tokens_per_step": stats.get("tokens_per_step"),
            "kv_reduction": stats.get("kv_reduction", 0.0),
        }
        print(f"  bundled {name}: {tokens / median:.1f} tokens/s", file=sys.stderr)
    base = rows["autoregressive"]["tokens_per_s"]
    for row in rows.values():
        row["speedup"] = row["tokens_per_s"] / base
    return {
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "gamma": args.gamma,
        "attn_p": args.attn_p,
        "granularity": args.granularity,
        "dtype": args.dtype,
        "rows": rows,
    }


# (b) 7B-shaped verifier, 1.1B-shaped draft, random weights, long contexts.


def _random_cache(config: LlamaConfig, batch: int, size: int, context: int, key) -> KVCache:
    shape = (batch, size, config.num_key_value_heads, config.head_dim)
    keys = jax.random.split(key, 2 * config.num_hidden_layers)
    k = tuple(jax.random.normal(keys[2 * i], shape, jnp.bfloat16) for i in range(len(keys) // 2))
    v = tuple(
        jax.random.normal(keys[2 * i + 1], shape, jnp.bfloat16) for i in range(len(keys) // 2)
    )
    return KVCache(k=k, v=v, lengths=jnp.full((batch,), context, jnp.int32))


def _random_plan(config, batch, size, context, kept, granularity, dense_layers, key):
    """A plan reading a random `kept` fraction of each sparse layer's context blocks."""
    num_blocks = size // granularity
    context_blocks = -(-context // granularity)
    count = max(1, round(kept * context_blocks))
    scores = jax.random.uniform(key, (config.num_hidden_layers, batch, num_blocks))
    scores = jnp.where(jnp.arange(num_blocks) < context_blocks, scores, -1.0)
    chosen = jnp.sort(jax.lax.top_k(scores, count)[1], axis=-1).astype(jnp.int32)
    indices = jnp.pad(chosen, ((0, 0), (0, 0), (0, num_blocks - count)))
    return AttentionPlan(
        block_indices=indices,
        block_counts=jnp.full((config.num_hidden_layers, batch), count, jnp.int32),
        granularity=granularity,
        sparse_layers=sparse_layer_flags(config.num_hidden_layers, dense_layers),
    )


def shrunk(config: LlamaConfig) -> LlamaConfig:
    """The same architecture at toy size (for a CPU smoke run of this script)."""
    return dataclasses.replace(
        config, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=min(config.num_key_value_heads, 2),
        head_dim=16,
    )  # fmt: skip


# The timed steps. Weights are arguments (never closed over: 13 GB of constants would be
# baked into the program), graph definitions static, caches donated; one compilation serves
# every context, since all share one cache allocation and the lengths are arrays.


@functools.partial(jax.jit, static_argnames=("graphdef", "attend"), donate_argnames="cache")
def _decode_step(graphdef, params, tokens, cache, lengths, attend):
    model = nnx.merge(graphdef, params)
    logits, cache, _ = model(tokens[:, :1], cache.with_lengths(lengths), attend=attend)
    return cache, logits


@functools.partial(jax.jit, static_argnames=("graphdef", "attend"), donate_argnames="cache")
def _verify_step(graphdef, params, tokens, cache, lengths, plan, attend):
    model = nnx.merge(graphdef, params)
    logits, cache, _ = model(tokens, cache.with_lengths(lengths), plan=plan, attend=attend)
    return cache, logits


@functools.partial(
    jax.jit, static_argnames=("graphdef", "gamma", "attention_layers"), donate_argnames="cache"
)
def _draft_step(graphdef, params, tokens, cache, lengths, key, gamma, attention_layers):
    drafts = draft_tokens(
        nnx.merge(graphdef, params), cache.with_lengths(lengths - 1), tokens[:, :2],
        GreedyAcceptance(), key, gamma, attention_layers,
    )  # fmt: skip
    return drafts.cache, drafts.attention


@functools.partial(jax.jit, static_argnames=("num_layers", "cache_size"))
def _select_step(selector, attention, lengths, num_layers, cache_size):
    inputs = SelectionInputs(
        context_lengths=lengths,
        draft_attention=attention,
        num_layers=num_layers,
        cache_size=cache_size,
    )
    return attention, selector.plan(inputs)


def step_times(
    verifier, draft, context: int, size: int, kept: float, args, place=lambda cache, tp: cache,
    verifier_attend=attend,
) -> dict[str, float]:  # fmt: skip
    """Median device seconds of one decode step and of a speculative step's parts, with
    `context` tokens in caches of `size` positions; `place(cache, tensor_parallel)` puts a
    freshly filled cache on its devices (default: where it was made); `verifier_attend` is
    the verifier's attention (`sharding.attention_for(mesh)` on a mesh)."""
    (v_graph, v_params, verifier_config), (d_graph, d_params, draft_config) = verifier, draft
    gamma, batch = args.gamma, 1
    key = jax.random.key(context)
    tokens = jax.random.randint(key, (batch, gamma + 1), 0, draft_config.vocab_size, jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    num_layers = verifier_config.num_hidden_layers
    num_draft_layers = draft_config.num_hidden_layers
    selector = SpecAttnSelector(
        attn_p=jnp.float32(args.attn_p),
        mapping=tuple(j * num_draft_layers // num_layers for j in range(num_layers)),
        granularity=args.granularity,
    )
    plan = _random_plan(verifier_config, batch, size, context, kept, args.granularity, 2, key)
    times = {}
    cache = place(_random_cache(verifier_config, batch, size, context, key), True)
    steps = {
        "decode": lambda state: _decode_step(
            v_graph, v_params, tokens, state[0], lengths, verifier_attend
        ),
        "verify_dense": lambda state: _verify_step(
            v_graph, v_params, tokens, state[0], lengths, None, verifier_attend
        ),
        "verify_sparse": lambda state: _verify_step(
            v_graph, v_params, tokens, state[0], lengths, plan, verifier_attend
        ),
    }
    state = (cache, None)
    for name, step in steps.items():
        times[name], state = device_time(step, state, calls=args.calls)
    del cache, state
    # Dense speculative decoding drafts without attention summaries; SpecAttn's draft
    # computes them in the layers its layer map uses. Each is charged what it runs.
    draft_state = (place(_random_cache(draft_config, batch, size, context, key), False), None)
    for name, layers in (("draft", ()), ("draft_summaries", selector.draft_layers)):
        times[name], draft_state = device_time(
            lambda state, layers=layers: _draft_step(
                d_graph, d_params, tokens, state[0], lengths, key, gamma, layers
            ),
            draft_state,
            calls=args.calls,
        )
    times["select"], _ = device_time(
        lambda state: _select_step(selector, state[0], lengths, num_layers, size),
        (draft_state[1], None),
        calls=args.calls,
    )
    return times


def bench_synthetic(args, measured: dict | None, save=lambda part: None) -> dict:
    gamma, batch = args.gamma, 1
    verifier_config, draft_config = LLAMA2_7B, TINYLLAMA_1B
    if args.tiny:
        verifier_config, draft_config = shrunk(LLAMA2_7B), shrunk(TINYLLAMA_1B)
    verifier = Llama(verifier_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    draft = Llama(draft_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    v_graph, v_params = nnx.split(verifier)
    d_graph, d_params = nnx.split(draft)
    rows = measured["rows"] if measured else {}
    source = "measured on the bundled pair" if rows else "assumed (bundled part skipped)"
    kept = 1 - rows["specattn"]["kv_reduction"] if rows else 0.3
    spec_tps = rows["speculative"]["tokens_per_step"] if rows else (gamma + 1) / 2
    specattn_tps = rows["specattn"]["tokens_per_step"] if rows else spec_tps
    results = []
    size = max(args.contexts) + 64  # one allocation (a multiple of 64) for every context
    report = {
        "cache_size": size,
        "verifier": dataclasses.asdict(verifier_config),
        "draft": dataclasses.asdict(draft_config),
        "gamma": gamma,
        "batch": batch,
        "kept_fraction": kept,
        "tokens_per_step": {"speculative": spec_tps, "specattn": specattn_tps},
        "tokens_per_step_source": source,
        "rows": results,
    }
    for context in args.contexts:
        times = step_times(
            (v_graph, v_params, verifier_config), (d_graph, d_params, draft_config),
            context, size, kept, args,
        )  # fmt: skip
        step_dense = times["draft"] + times["verify_dense"]
        step_sparse = times["draft_summaries"] + times["select"] + times["verify_sparse"]
        results.append(
            {
                "context": context,
                **{f"{name}_ms": 1e3 * seconds for name, seconds in times.items()},
                "tokens_per_s": {
                    "autoregressive": 1 / times["decode"],
                    "speculative": spec_tps / step_dense,
                    "specattn": specattn_tps / step_sparse,
                },
            }
        )
        print(f"  synthetic {context}: {results[-1]}", file=sys.stderr)
        save(report)  # each context as it finishes: a long run cut short keeps what it has
    return report


def print_tables(report: dict) -> None:
    bundled = report.get("bundled")
    if bundled:
        print(
            f"\nBundled pair, batch {bundled['batch']}, prompt {bundled['prompt_len']} tokens, "
            f"{bundled['new_tokens']} new tokens, gamma {bundled['gamma']}, {bundled['dtype']}"
        )
        print("| decoder | tokens/s | speedup | acceptance | tokens/step | KV reduction |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, row in bundled["rows"].items():
            acceptance = row["acceptance_rate"]
            print(
                f"| {name} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
                + (f"{acceptance:.1%}" if acceptance is not None else "-")
                + f" | {row['tokens_per_step']:.2f} | {row['kv_reduction']:.1%} |"
            )
    synthetic = report.get("synthetic")
    if synthetic:
        print(
            f"\nLlama-2-7B-shaped verifier + TinyLlama-1.1B-shaped draft (random bf16 weights), "
            f"batch 1, gamma {synthetic['gamma']}, caches allocated for "
            f"{synthetic.get('cache_size')} positions: per-step latency, and tokens/s at the "
            f"tokens/step {synthetic['tokens_per_step']} with the sparse verify reading a "
            f"kept fraction of {synthetic['kept_fraction']:.2f}, both "
            f"{synthetic['tokens_per_step_source']}"
        )
        print(
            "| context | AR decode ms | draft ms | draft + summaries ms | select ms | "
            "dense verify ms | sparse verify ms | AR tok/s | spec tok/s | SpecAttn tok/s |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in synthetic["rows"]:
            tps = row["tokens_per_s"]
            print(
                f"| {row['context']} | {row['decode_ms']:.2f} | {row['draft_ms']:.2f} | "
                f"{row['draft_summaries_ms']:.2f} | {row['select_ms']:.3f} | "
                f"{row['verify_dense_ms']:.2f} | "
                f"{row['verify_sparse_ms']:.2f} | {tps['autoregressive']:.1f} | "
                f"{tps['speculative']:.1f} | {tps['specattn']:.1f} |"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_generate.json")
    parser.add_argument("--skip-bundled", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument(
        "--bundled-from",
        help="with --skip-bundled: take part (a)'s measurements from this earlier JSON report",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--attn-p", type=float, default=0.97)
    parser.add_argument("--granularity", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="toy model sizes (CPU smoke run)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument(
        "--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 32768]
    )
    args = parser.parse_args(argv)
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}

    def save(synthetic=None):
        if synthetic is not None:
            report["synthetic"] = synthetic
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    if not args.skip_bundled:
        report["bundled"] = bench_bundled(args)
        save()
    elif args.bundled_from:
        report["bundled"] = json.loads(Path(args.bundled_from).read_text())["bundled"]
        report["bundled"]["from"] = args.bundled_from
    if not args.skip_synthetic:
        bench_synthetic(args, report.get("bundled"), save)
    save()
    print(f"device: {report['device']}, jax {report['jax']}")
    print_tables(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Acceptance of a draft on test text: how many drafted tokens the verifier takes.

Prompts are consecutive windows of the test books (`eval.make_windows`, round-robin over the
books), each continued by dense speculative decoding (no sparsity: the acceptance is the
draft's alone), greedy and with temperature 1, in one batch. With `--attn-p`, also greedy
SpecAttn at each p (the verifier reading the draft-selected entries, `--layer-map` or one
calibrated on the prompts), with the KV reduction it measured: the tokens/step and kept
fraction from which long-context speeds are derived (`bench_longctx.py
--tokens-per-step-from`). Prints a table and writes JSON.

    python benchmarks/draft_acceptance.py --verifier SmolLM2-135M-Instruct.Q4_1.gguf \\
        --draft runs/smollm2-draft/hf --out runs/acceptance.json \\
        [--attn-p 0.9,0.95 --layer-map configs/smollm2-draft/layer_map.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from specattn_jax import LayerMap, SpecConfig, generate, load_pair, make_sampler
from specattn_jax.data import load_split_texts
from specattn_jax.errors import SpecAttnError
from specattn_jax.eval import make_windows

SAMPLERS = {"greedy": make_sampler(0.0), "temperature 1": make_sampler(1.0)}


def settings(args) -> dict[str, tuple[SpecConfig, object]]:
    """Setting name -> (config, sampler): dense speculative decoding with each sampler, then
    greedy SpecAttn at each of `args.attn_p`."""
    dense = {name: (SpecConfig(gamma=args.gamma), s) for name, s in SAMPLERS.items()}
    layer_map = LayerMap.load(args.layer_map) if args.layer_map else None
    sparse = {
        f"specattn p={p:g}, greedy": (
            SpecConfig(gamma=args.gamma, attn_p=p, layer_map=layer_map), SAMPLERS["greedy"]
        )
        for p in args.attn_p
    }  # fmt: skip
    return {**dense, **sparse}


def measure(args) -> tuple[list[dict], int]:
    """One row per setting of `settings(args)` on the test prompts, and how many prompts."""
    runs = settings(args)
    draft, verifier, tokenizer = load_pair(args.verifier, args.draft, args.dtype)
    texts = load_split_texts("test", args.data_dir)
    prompts = make_windows(tokenizer, texts, args.prompt_tokens, args.prompts).tolist()
    rows = []
    for name, (config, sampler) in runs.items():
        start = time.perf_counter()
        stats = generate(
            draft, verifier, prompts, config, max_new_tokens=args.new_tokens, eos_id=None,
            sampler=sampler, key=jax.random.key(0),
        ).stats  # fmt: skip
        rows.append(
            {
                "setting": name,
                "attn_p": config.attn_p,
                "acceptance_rate": stats["acceptance_rate"],
                "tokens_per_step": stats["tokens_per_step"],
                "kv_reduction": stats["kv_reduction"],
                "steps": stats["steps"],
                "seconds_with_compile": round(time.perf_counter() - start, 1),
            }
        )
    return rows, len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--data-dir", default=None, help="the Gutenberg folder")
    parser.add_argument("--prompts", type=int, default=8, help="prompts (one batch)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--attn-p", type=lambda text: [float(p) for p in text.split(",")], default=[],
        help="comma-separated SpecAttn p values to add (greedy)",
    )  # fmt: skip
    parser.add_argument("--layer-map", default=None, help="layer map JSON for --attn-p")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    try:  # bad input (a p outside (0, 1], a missing checkpoint or layer map): one line
        rows, num_prompts = measure(args)
    except SpecAttnError as error:
        parser.error(str(error))
    device = jax.devices()[0].device_kind
    print(
        f"{num_prompts} test prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
        f"tokens each, gamma {args.gamma}, {args.dtype}, {device}"
    )
    print("| setting | acceptance | tokens/step | KV reduction |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['setting']} | {row['acceptance_rate']:.1%} | {row['tokens_per_step']:.2f} "
            f"| {row['kv_reduction']:.1%} |"
        )
    if args.out:
        payload = {
            "verifier": args.verifier,
            "draft": args.draft,
            "device": device,
            "prompts": num_prompts,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "gamma": args.gamma,
            "dtype": args.dtype,
            "layer_map": args.layer_map,
            "rows": rows,
        }
        args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()

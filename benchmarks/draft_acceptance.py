"""Acceptance of a draft on test text: how many drafted tokens the verifier takes.

Prompts are consecutive windows of the test books (`eval.make_windows`, round-robin over the
books), each continued by dense speculative decoding (no sparsity: the acceptance is the
draft's alone), greedy and with temperature 1, in one batch. Prints a table and writes JSON.

    python benchmarks/draft_acceptance.py --verifier SmolLM2-135M-Instruct.Q4_1.gguf \\
        --draft runs/smollm2-draft/hf --out runs/acceptance.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from specattn_jax import SpecConfig, generate, load_pair, make_sampler
from specattn_jax.data import load_split_texts
from specattn_jax.eval import make_windows

SETTINGS = {"greedy": make_sampler(0.0), "temperature 1": make_sampler(1.0)}


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
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()

    draft, verifier, tokenizer = load_pair(args.verifier, args.draft, args.dtype)
    texts = load_split_texts("test", args.data_dir)
    prompts = make_windows(tokenizer, texts, args.prompt_tokens, args.prompts).tolist()
    rows = []
    for name, sampler in SETTINGS.items():
        run = lambda sampler=sampler: generate(  # noqa: E731
            draft, verifier, prompts, SpecConfig(gamma=args.gamma),
            max_new_tokens=args.new_tokens, eos_id=None, sampler=sampler, key=jax.random.key(0),
        )  # fmt: skip
        start = time.perf_counter()
        stats = run().stats
        rows.append(
            {
                "setting": name,
                "acceptance_rate": stats["acceptance_rate"],
                "tokens_per_step": stats["tokens_per_step"],
                "steps": stats["steps"],
                "seconds_with_compile": round(time.perf_counter() - start, 1),
            }
        )
    device = jax.devices()[0].device_kind
    print(
        f"{len(prompts)} test prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
        f"tokens each, gamma {args.gamma}, {args.dtype}, {device}"
    )
    print("| setting | acceptance | tokens/step |\n| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['setting']} | {row['acceptance_rate']:.1%} | {row['tokens_per_step']:.2f} |")
    if args.out:
        payload = {
            "verifier": args.verifier,
            "draft": args.draft,
            "device": device,
            "prompts": len(prompts),
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "gamma": args.gamma,
            "dtype": args.dtype,
            "rows": rows,
        }
        args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The `specattn` command line.

Every command takes `--json` for one machine-readable object on stdout. Bad input is one
line on stderr (`specattn: error: ...`) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from specattn_jax.errors import SpecAttnError

DTYPES = ("float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors."""

    def error(self, message):
        raise SpecAttnError(f"{self.prog}: {message}")


def _jnp_dtype(name: str):
    import jax.numpy as jnp

    return jnp.dtype(name)


def _load(source: str, dtype: str):
    from specattn_jax.loading import load_pretrained

    return load_pretrained(source, dtype=_jnp_dtype(dtype))


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise SpecAttnError("the checkpoint has no tokenizer; pass --prompt-ids instead")
    return list(tokenizer(text)["input_ids"])


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids:
        try:
            return [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            raise SpecAttnError(
                f"--prompt-ids {args.prompt_ids!r} is not a comma-separated list of ints"
            ) from None
    return _encode(tokenizer, args.prompt)


def _emit(args, payload: dict, text_lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        for line in text_lines:
            print(line)


def _load_pair(args):
    """(draft or None, verifier, tokenizer), checked to share one vocabulary."""
    from specattn_jax.speculative import check_compatible

    verifier, tokenizer = _load(args.verifier, args.dtype)
    if not args.draft:
        return None, verifier, tokenizer
    draft, draft_tokenizer = _load(args.draft, args.dtype)
    check_compatible(draft, verifier, draft_tokenizer, tokenizer)
    return draft, verifier, tokenizer


def cmd_generate(args) -> None:
    import jax

    from specattn_jax.sampling import make_sampler
    from specattn_jax.speculative import SpecConfig, generate_stream

    draft, verifier, tokenizer = _load_pair(args)
    prompt = _prompt_ids(args, tokenizer)
    stream = generate_stream(
        draft,
        verifier,
        [prompt],
        SpecConfig(gamma=args.gamma),
        max_new_tokens=args.max_new_tokens,
        sampler=make_sampler(args.temperature, args.top_k, args.top_p),
        key=jax.random.key(args.seed),
        cache_size=args.cache_size,
    )
    tokens: list[int] = []
    printed = ""
    start = time.perf_counter()
    stats = {}
    for new_tokens, step_stats in stream:
        tokens += new_tokens[0]
        stats = step_stats
        if not args.json and tokenizer is not None:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    seconds = time.perf_counter() - start
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    stats = {
        **stats,
        "seconds": round(seconds, 3),
        "decoder": "speculative" if draft is not None else "autoregressive",
    }
    if args.json:
        print(json.dumps({"tokens": tokens, "text": text, "stats": stats}))
    else:
        print()
        print(_stats_line(stats), file=sys.stderr)


def _stats_line(stats: dict) -> str:
    parts = [f"{stats['decoder']}: {stats['tokens']} tokens, {stats['steps']} steps"]
    if "acceptance_rate" in stats:
        parts.append(f"acceptance {stats['acceptance_rate']:.1%}")
        parts.append(f"{stats['tokens_per_step']:.2f} tokens/step")
    parts.append(f"{stats['seconds']:.2f} s")
    return "[" + ", ".join(parts) + "]"


def cmd_convert(args) -> None:
    from convert.hf import save_hf_model
    from convert.orbax_io import save_orbax

    model, tokenizer = _load(args.src, args.dtype)
    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()):
        raise SpecAttnError(f"destination {dst} exists and is not empty")
    if args.format == "hf":
        save_hf_model(model, dst, dtype=args.dtype)
    else:
        save_orbax(model, dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    _emit(
        args,
        {"src": args.src, "dst": str(dst), "format": args.format, "dtype": args.dtype},
        [f"wrote {args.format} checkpoint ({args.dtype}) to {dst}"],
    )


def _default_demo_model() -> tuple[str, str]:
    from specattn_jax.loading import ASSETS

    if (ASSETS / "verifier" / "config.json").is_file():
        return "bundled:verifier", "the bundled verifier"
    stories = Path.cwd().parent / "shared" / "models" / "stories260K" / "stories260K.bin"
    if stories.is_file():
        return str(
            stories
        ), f"stories260K from {stories.parent} (the bundled pair is not installed)"
    raise SpecAttnError(
        "no bundled model is installed and ../shared/models/stories260K is not beside the "
        "current directory; pass --verifier PATH"
    )


def cmd_demo(args) -> None:
    from specattn_jax.autoregressive import generate_autoregressive

    source, description = (args.verifier, args.verifier) if args.verifier else _default_demo_model()
    model, tokenizer = _load(source, args.dtype)
    prompt = _encode(tokenizer, args.prompt)
    generate_autoregressive(model, [prompt], max_new_tokens=args.max_new_tokens)  # compile
    start = time.perf_counter()
    result = generate_autoregressive(model, [prompt], max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(prompt + result.tokens[0], skip_special_tokens=True)
    stats = {**result.stats, "seconds": round(seconds, 3)}
    _emit(
        args,
        {"model": source, "text": text, "tokens": result.tokens[0], "stats": stats},
        [
            f"model: {description}",
            f"prompt: {args.prompt!r}",
            "",
            text,
            "",
            f"autoregressive: {stats['tokens']} tokens in {stats['steps']} steps, "
            f"{stats['tokens'] / seconds:.1f} tokens/s (warm)",
        ],
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specattn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="generate from a prompt and print the statistics")
    demo.add_argument("--verifier", help="checkpoint (default: the bundled verifier)")
    demo.add_argument("--prompt", default="Once upon a time")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    _add_common(demo)
    demo.set_defaults(run=cmd_demo)

    generate = commands.add_parser("generate", help="decode text from a prompt")
    generate.add_argument("--verifier", default="bundled:verifier")
    generate.add_argument("--draft", help="draft checkpoint (omit for autoregressive decoding)")
    generate.add_argument("--gamma", type=int, default=4, help="tokens drafted per step")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--cache-size", type=int, help="KV positions (default: what is needed)")
    _add_common(generate)
    generate.set_defaults(run=cmd_generate)

    convert = commands.add_parser("convert", help="convert a checkpoint to HF or orbax format")
    convert.add_argument("src", help="HF directory, orbax directory, llama2.c .bin, or hub id")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--format", choices=("hf", "orbax"), default="hf")
    _add_common(convert)
    convert.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except SpecAttnError as e:
        print(f"specattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specattn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

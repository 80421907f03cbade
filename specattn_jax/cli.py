"""The `specattn` command line.

Every command takes `--json` for one machine-readable object on stdout. Bad input is one
line on stderr (`specattn: error: ...`, or with `--json` one object `{"error": ...}`) and exit
status 2, never a traceback. Commands that run a model first print a header line on stderr:
the device, the attention backend (Pallas kernel or `jnp` reference) and the dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import default_backend
from specattn_jax import distill, train
from specattn_jax.chat import chat_prompt
from specattn_jax.convert.hf import save_hf_model
from specattn_jax.convert.orbax_io import save_orbax
from specattn_jax.data import SPLITS, load_split_dataset
from specattn_jax.demo import format_report, run_demo
from specattn_jax.errors import SpecAttnError
from specattn_jax.eval import MethodFactory, PerplexityProtocol, make_windows
from specattn_jax.eval.methods import BUDGET_METHODS, DRAFT_METHODS, METHODS
from specattn_jax.eval.report import compare_methods, markdown_table
from specattn_jax.layer_map import CHOICES, LayerMap, calibrate
from specattn_jax.loading import (
    ASSETS,
    default_draft,
    default_layer_map,
    load_pair,
    load_pretrained,
)
from specattn_jax.sampling import make_sampler
from specattn_jax.sharding import make_mesh
from specattn_jax.speculative import SpecConfig, generate_stream
from specattn_jax.stopping import text_before_stop

DTYPES = ("float32", "bfloat16", "float16")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is unset (None) or a flag's off state."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (naming the subcommand, if any) and defaults in
    `--help`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        command = self.prog.removeprefix("specattn").strip()
        raise SpecAttnError(f"{command}: {message}" if command else message)


def package_version() -> str:
    """The installed distribution's version; run from a checkout that is not installed (its
    folder on PYTHONPATH, as on the GPU machine), it says so instead."""
    try:
        return distribution_version("specattn-jax")
    except PackageNotFoundError:
        return "(not installed: run from a checkout)"


def default_dtype() -> str:
    """bfloat16 on a GPU, float32 elsewhere."""
    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def run_context(dtype: str) -> dict:
    """Where a run happens: device, attention backend and dtype (the header line)."""
    devices = jax.devices()
    device = f"{devices[0].platform} ({devices[0].device_kind})"
    backend = default_backend()
    return {
        "device": device if len(devices) == 1 else f"{len(devices)} x {device}",
        "backend": "pallas kernels" if backend == "pallas" else "jnp reference",
        "dtype": dtype,
    }


def _header(args) -> dict:
    """Prints the run's header line on stderr (not with --json); returns its fields."""
    context = run_context(args.dtype)
    if not args.json:
        print(
            f"specattn {args.command}: {context['device']}, attention: {context['backend']}, "
            f"dtype {context['dtype']}",
            file=sys.stderr,
        )
    return context


def _note(args, message: str) -> None:
    if not args.json:
        print(f"note: {message}", file=sys.stderr)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _jnp_dtype(name: str):
    return jnp.dtype(name)


def _load(source: str, dtype: str):
    return load_pretrained(source, dtype=_jnp_dtype(dtype))


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise SpecAttnError("the checkpoint has no tokenizer; pass --prompt-ids instead")
    return list(tokenizer(text, verbose=False)["input_ids"])


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            raise SpecAttnError(
                f"--prompt-ids {args.prompt_ids!r} is not a comma-separated list of ints"
            ) from None
    if not args.prompt.strip():
        raise SpecAttnError("--prompt is empty")
    if args.chat:
        return chat_prompt(tokenizer, args.prompt, args.system)
    return _encode(tokenizer, args.prompt)


def _emit(args, payload: dict, text_lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        for line in text_lines:
            print(line)


def _draft_source(args) -> str | None:
    """The --draft option: 'none' for no draft, unset for the verifier's default draft."""
    if args.draft == "none":
        return None
    return args.draft or default_draft(args.verifier)


def _load_pair(args):
    """(draft or None, verifier, tokenizer), checked to share one vocabulary."""
    return load_pair(args.verifier, _draft_source(args), _jnp_dtype(args.dtype))


def _mesh(args):
    """The `--mesh` option as a `Mesh` (None without it)."""
    if not args.mesh:
        return None

    return make_mesh(args.mesh)


def _layer_map(args) -> LayerMap | None:
    """--layer-map, else the bundled map for the bundled pair, else None (calibrate)."""
    if args.layer_map:
        return LayerMap.load(args.layer_map)
    return default_layer_map(args.verifier, _draft_source(args))


def _spec_config(args):
    """The `SpecConfig` of the generate options (SpecAttn when --attn-p is given)."""
    layer_map = _layer_map(args)
    config = SpecConfig(
        gamma=args.gamma,
        attn_p=args.attn_p,
        granularity=args.granularity,
        dense_layers=args.dense_layers,
        sinks=args.sinks,
        recent=args.recent,
        history_p=args.history_p,
        layer_map=layer_map,
    )
    if args.attn_p is not None and layer_map is None:
        _note(
            args,
            "no --layer-map given; calibrating one on the prompt (run `specattn calibrate` "
            "once for a better map)",
        )
    return config


def _check_prompt_ids(prompt: list[int], vocab_size: int) -> None:
    outside = [token for token in prompt if not 0 <= token < vocab_size]
    if outside:
        raise SpecAttnError(
            f"prompt token ids {outside[:5]} are outside the verifier's vocabulary "
            f"(0..{vocab_size - 1})"
        )


def cmd_generate(args) -> None:
    context = _header(args)
    if args.draft is None and _draft_source(args) is None:
        _note(
            args,
            f"{args.verifier} has no default draft: decoding autoregressively. For "
            f"speculative decoding pass --draft PATH, a smaller Llama with the same tokenizer",
        )
    draft, verifier, tokenizer = _load_pair(args)
    if args.attn_p is not None and draft is None:
        raise SpecAttnError("--attn-p (SpecAttn) needs a --draft model")
    if args.system is not None and not args.chat:
        raise SpecAttnError("--system needs --chat")
    if args.chat and args.prompt is None:
        raise SpecAttnError("--chat needs --prompt (text), not --prompt-ids")
    prompt = _prompt_ids(args, tokenizer)
    _check_prompt_ids(prompt, verifier.config.vocab_size)
    decoder = (
        "autoregressive"
        if draft is None
        else ("specattn" if args.attn_p is not None else "speculative")
    )
    _note(args, f"{decoder} decoding; compiling the prefill and the step")
    stream = generate_stream(
        draft,
        verifier,
        [prompt],
        _spec_config(args),
        max_new_tokens=args.max_new_tokens,
        sampler=make_sampler(
            args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty
        ),
        key=jax.random.key(args.seed),
        cache_size=args.cache_size,
        mesh=_mesh(args),
        prefill_chunk=args.prefill_chunk,
        stop_strings=args.stop,
        tokenizer=tokenizer,
    )
    tokens: list[int] = []
    stops = args.stop or ()
    printed = ""
    start = time.perf_counter()
    # Yields come after the prefill, then after each step; the first step compiles, so the
    # warm rate counts from its end.
    warm_start, warm_tokens = None, 0
    for index, (new_tokens, step_stats) in enumerate(stream):
        tokens += new_tokens[0]
        stats = step_stats
        if index == 1:
            warm_start, warm_tokens = time.perf_counter(), len(tokens)
        if not args.json and tokenizer is not None:
            text = text_before_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    end = time.perf_counter()
    text = None
    if tokenizer is not None:
        text = text_before_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
    warm_seconds = end - warm_start if warm_start is not None else 0.0
    stats = {
        **stats,
        "seconds": round(end - start, 3),
        "tokens_per_second": (len(tokens) - warm_tokens) / warm_seconds
        if warm_seconds > 0 and len(tokens) > warm_tokens
        else None,
        "decoder": decoder,
    }
    if args.json:
        payload = {"prompt_ids": prompt, "tokens": tokens, "text": text, "stats": stats}
        print(json.dumps({**payload, **context}))
    else:
        print()
        print(_stats_line(stats), file=sys.stderr)


def _stats_line(stats: dict) -> str:
    parts = [
        f"{stats['decoder']}: {_plural(stats['tokens'], 'token')}, "
        f"{_plural(stats['steps'], 'step')}"
    ]
    if stats.get("acceptance_rate") is not None:
        parts.append(f"acceptance {stats['acceptance_rate']:.1%}")
        parts.append(f"{stats['tokens_per_step']:.2f} tokens/step")
    if stats["decoder"] == "specattn":
        parts.append(f"KV reduction {stats['kv_reduction']:.1%}")
    parts.append(f"{stats['seconds']:.2f} s")
    if stats.get("tokens_per_second") is not None:
        parts.append(f"{stats['tokens_per_second']:.1f} tokens/s after compiling")
    return "[" + ", ".join(parts) + "]"


def read_text_source(source: str) -> str:
    """The text of a file, or of every *.txt file under a directory (sorted), joined."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SpecAttnError(f"no .txt files under {path}")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    raise SpecAttnError(f"text not found: {source}")


def cmd_calibrate(args) -> None:
    _header(args)
    draft, verifier, tokenizer = _load_pair(args)
    if draft is None:
        raise SpecAttnError("calibrate needs --draft")
    if args.seq_len < 2 or args.num_sequences < 1:
        raise SpecAttnError("--seq-len must be >= 2 and --num-sequences >= 1")
    text = "\n\n".join(load_eval_texts(args.text, args.data_dir))
    ids = np.array(_encode(tokenizer, text), np.int32)
    count = min(args.num_sequences, len(ids) // args.seq_len)
    if count < 1:
        raise SpecAttnError(
            f"{args.text} has {len(ids)} tokens, fewer than one sequence of --seq-len "
            f"{args.seq_len}"
        )
    stride = len(ids) // count  # spread the sequences over the whole text
    sequences = [ids[i * stride : i * stride + args.seq_len] for i in range(count)]
    layer_map = calibrate(
        draft, verifier, sequences, progress=not args.json, source=args.text, choose=args.choose
    )
    layer_map.save(args.out)
    if args.plot:
        layer_map.plot(args.plot)
    mix_lines = []
    if layer_map.mix is not None:
        mix_lines = ["layer mix (verifier layer: weight x draft layer):"] + [
            f"  {j}: " + " + ".join(f"{w:.2f} x {i}" for i, w in enumerate(row) if w)
            for j, row in enumerate(layer_map.mix)
        ]
    _emit(
        args,
        {
            "out": args.out,
            "plot": args.plot,
            "mapping": list(layer_map.mapping),
            "mix": layer_map.mix and [list(row) for row in layer_map.mix],
        },
        [
            f"layer map (verifier layer -> draft layer): {list(layer_map.mapping)}",
            *mix_lines,
            f"calibrated on {count} sequences of {args.seq_len} tokens; wrote {args.out}"
            + (f" and {args.plot}" if args.plot else ""),
        ],
    )


def load_eval_texts(data: str, data_dir: str | None = None) -> list[str]:
    """Texts of a corpus split ("train", "validation", "test", through `datasets`) or of a
    file or directory of .txt files."""
    if data in SPLITS:
        return list(load_split_dataset(data, data_dir)["text"])
    return [read_text_source(data)]


def _method_value(args) -> float:
    """--budget for the budget baselines, --attn-p for the others; the wrong one is refused."""
    if args.method in BUDGET_METHODS:
        if args.attn_p is not None:
            raise SpecAttnError(f"--attn-p does not apply to {args.method}: give --budget")
        return 0.3 if args.budget is None else args.budget
    if args.budget is not None:
        raise SpecAttnError(f"--budget does not apply to {args.method}: give --attn-p")
    return 0.97 if args.attn_p is None else args.attn_p


def cmd_eval_ppl(args) -> None:
    _header(args)
    value = _method_value(args)
    draft, verifier, tokenizer = _load_pair(args)
    if draft is None:
        raise SpecAttnError("eval-ppl needs --draft (its drafts drive every step)")
    mesh = _mesh(args)
    protocol = PerplexityProtocol(
        window=args.window, prefix=args.prefix, gamma=args.gamma, batch_size=args.batch_size
    )
    windows = make_windows(
        tokenizer, load_eval_texts(args.data, args.data_dir), args.window, args.num_windows
    )
    calibration = make_windows(
        tokenizer, load_eval_texts(args.calibration_data, args.data_dir), args.window, 4
    )
    layer_map = _layer_map(args)
    factory = MethodFactory(
        draft,
        verifier,
        calibration,
        layer_map=layer_map,
        granularity=args.granularity,
        dense_layers=args.dense_layers,
        progress=not args.json,
    )
    if layer_map is None and args.method in DRAFT_METHODS:
        _note(args, f"no --layer-map given: calibrating one on {args.calibration_data} first")
    factory.selector(args.method, value)  # validate (and calibrate) before the long run
    rows = compare_methods(
        factory, windows, protocol, [(args.method, value)], mesh=mesh, progress=not args.json
    )
    payload = {
        "data": args.data,
        "windows": len(windows),
        "window": args.window,
        "prefix": args.prefix,
        "gamma": args.gamma,
        "rows": rows,
    }
    _emit(args, payload, [markdown_table(rows)])


def cmd_train(argv: list[str]) -> None:
    """`specattn train ...`: the recipe's options, and the distillation's (see --help)."""
    parser = _Parser(
        prog="specattn train",
        description="Train a Llama on the Gutenberg train books: from scratch with the "
        "project's recipe, or as a draft distilled from a verifier (--distill-from).",
    )
    train.add_arguments(parser)
    distill.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.distill_from is not None:
        distill.run(args)
    else:
        for option in ("lm_weight", "attention_weight"):
            if getattr(args, option) is not None:
                raise SpecAttnError(f"--{option.replace('_', '-')} needs --distill-from")
        train.run(args)


def cmd_convert(args) -> None:
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


def _default_demo_pair() -> tuple[str, str | None]:
    if (ASSETS / "verifier" / "config.json").is_file():
        return "bundled:verifier", "bundled:draft"
    stories = Path.cwd().parent / "shared" / "models" / "stories260K" / "stories260K.bin"
    if stories.is_file():
        return str(stories), None
    raise SpecAttnError(
        "no bundled model is installed and ../shared/models/stories260K is not beside the "
        "current directory; pass --verifier PATH"
    )


def cmd_demo(args) -> None:
    context = _header(args)
    if args.verifier:
        verifier, draft = args.verifier, args.draft or default_draft(args.verifier)
    else:
        verifier, draft = _default_demo_pair()
    if not args.json:
        print(f"loading {verifier}" + (f" and {draft}" if draft else "") + " ...", file=sys.stderr)
    report = run_demo(
        verifier,
        draft,
        prompt=args.prompt,
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        gamma=args.gamma,
        attn_p=args.attn_p,
        dtype=_jnp_dtype(args.dtype),
        log=lambda message: _note(args, message),
    )
    _emit(args, {**report, **context}, format_report(report))


def _add_mesh(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mesh",
        help="devices to run on, e.g. model=2 (verifier tensor-parallel) or data=2,model=2",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="parameters and activations (default: bfloat16 on a GPU, float32 on CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specattn", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version",
        action="version",
        version=f"specattn {package_version()}",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser(
        "demo", help="autoregressive vs speculative vs SpecAttn on the bundled pair"
    )
    demo.add_argument("--verifier", help="checkpoint (default: the bundled verifier)")
    demo.add_argument("--draft", help="draft checkpoint (default: the bundled draft)")
    demo.add_argument("--prompt", help="prompt text (default: an excerpt of a test book)")
    demo.add_argument(
        "--prompt-tokens", type=int, default=1024, help="tokens of the default prompt"
    )
    demo.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    demo.add_argument("--gamma", type=int, default=4, help="tokens drafted per step")
    demo.add_argument("--attn-p", type=float, default=0.97, help="SpecAttn's attention mass")
    _add_common(demo)
    demo.set_defaults(run=cmd_demo)

    generate = commands.add_parser("generate", help="decode text from a prompt")
    generate.add_argument(
        "--verifier", default="bundled:verifier", help="checkpoint: directory, GGUF, .bin, hub id"
    )
    generate.add_argument(
        "--draft",
        help="draft checkpoint; 'none' decodes autoregressively (default: the bundled draft "
        "for the bundled verifier, none for any other)",
    )
    generate.add_argument("--gamma", type=int, default=4, help="tokens drafted per step")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    generate.add_argument(
        "--chat",
        action="store_true",
        help="send --prompt as a user turn in the tokenizer's chat template",
    )
    generate.add_argument("--system", help="system prompt (with --chat)")
    generate.add_argument(
        "--stop",
        action="append",
        help="stop after this text; repeat for several (the output ends before it)",
    )
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)"
    )
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest")
    generate.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="keep tokens at least this fraction as likely as the likeliest",
    )
    generate.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already in the text (1: none; greedy too)",
    )
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--cache-size", type=int, help="KV positions (default: what is needed)")
    generate.add_argument(
        "--prefill-chunk", type=int, help="prompt tokens per prefill forward (default: all)"
    )
    generate.add_argument(
        "--attn-p", type=float, help="SpecAttn: attention mass to keep (enables sparse verify)"
    )
    generate.add_argument("--layer-map", help="layer map JSON from `specattn calibrate`")
    generate.add_argument("--granularity", type=int, default=1, help="tokens per KV block")
    generate.add_argument(
        "--dense-layers", type=int, default=2, help="leading verifier layers kept dense"
    )
    generate.add_argument("--sinks", type=int, default=0, help="leading tokens always read")
    generate.add_argument("--recent", type=int, default=0, help="recent tokens always read")
    generate.add_argument(
        "--history-p",
        type=float,
        help="with --attn-p: each sparse layer also reads the top-p set (this mass) of its "
        "own attention in the last verify",
    )
    _add_mesh(generate)
    _add_common(generate)
    generate.set_defaults(run=cmd_generate)

    calibrate = commands.add_parser("calibrate", help="calibrate the verifier->draft layer map")
    calibrate.add_argument("--verifier", default="bundled:verifier", help="verifier checkpoint")
    calibrate.add_argument(
        "--draft", help="draft checkpoint (default: the bundled draft for the bundled verifier)"
    )
    calibrate.add_argument(
        "--text", required=True, help="a split name (validation), a .txt file or a directory"
    )
    calibrate.add_argument("--data-dir", help="corpus folder (default ../shared/data/gutenberg)")
    calibrate.add_argument("--out", required=True, help="where to write the map (JSON)")
    calibrate.add_argument("--plot", help="also draw the KL heatmap to this PNG")
    calibrate.add_argument(
        "--choose",
        choices=CHOICES,
        default="kl",
        help="the map: the KL scores' best (kl), or the distillation groups' (groups: for a "
        "draft distilled with the attention loss, each verifier layer to the draft layer "
        "that learned it), or the KL map plus a layer mix (mix: each verifier layer reads "
        "a fitted weighted mix of the draft layers' attention)",
    )
    calibrate.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    calibrate.add_argument("--num-sequences", type=int, default=16, help="sequences to average")
    _add_common(calibrate)
    calibrate.set_defaults(run=cmd_calibrate)

    evaluate = commands.add_parser(
        "eval-ppl", help="decode-time perplexity and measured KV reduction of a method"
    )
    evaluate.add_argument("--verifier", default="bundled:verifier", help="verifier checkpoint")
    evaluate.add_argument(
        "--draft", help="draft checkpoint (default: the bundled draft for the bundled verifier)"
    )
    evaluate.add_argument(
        "--method", default="specattn", choices=METHODS, help="KV selection method"
    )
    evaluate.add_argument(
        "--attn-p", type=float, help="specattn / oracle: attention mass to keep (default 0.97)"
    )
    evaluate.add_argument(
        "--budget",
        type=float,
        help="quest / double_sparsity / streamingllm: KV fraction (default 0.3)",
    )
    evaluate.add_argument("--data", default="test", help="split name or a .txt file/directory")
    evaluate.add_argument(
        "--calibration-data", default="validation", help="text to calibrate a layer map on"
    )
    evaluate.add_argument("--data-dir", help="corpus folder (default ../shared/data/gutenberg)")
    evaluate.add_argument("--window", type=int, default=2048, help="tokens per window")
    evaluate.add_argument("--prefix", type=int, default=1024, help="prefilled tokens per window")
    evaluate.add_argument("--gamma", type=int, default=4, help="tokens drafted per step")
    evaluate.add_argument("--num-windows", type=int, default=8, help="windows to score")
    evaluate.add_argument("--batch-size", type=int, default=4, help="windows per batch")
    evaluate.add_argument("--granularity", type=int, default=1, help="tokens per KV block")
    evaluate.add_argument(
        "--dense-layers", type=int, default=2, help="leading verifier layers kept dense"
    )
    evaluate.add_argument(
        "--layer-map",
        help="layer map JSON (default: the bundled map for the bundled pair, else calibrate one)",
    )
    _add_mesh(evaluate)
    _add_common(evaluate)
    evaluate.set_defaults(run=cmd_eval_ppl)

    trainer = commands.add_parser(
        "train",
        help="train a Llama with the project's recipe (see specattn train --config ...)",
        add_help=False,
    )
    trainer.add_argument("train_args", nargs=argparse.REMAINDER)

    convert = commands.add_parser("convert", help="convert a checkpoint to HF or orbax format")
    convert.add_argument(
        "src", help="HF directory, orbax directory, GGUF file, llama2.c .bin, or hub id"
    )
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--format", choices=("hf", "orbax"), default="hf", help="output format")
    _add_common(convert)
    convert.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train"]:  # the recipe parses its own options
            cmd_train(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        if getattr(args, "dtype", "") is None:
            args.dtype = default_dtype()
        args.run(args)
    except SpecAttnError as e:
        if "--json" in argv:
            print(json.dumps({"error": str(e)}), file=sys.stderr)
        else:
            print(f"specattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specattn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

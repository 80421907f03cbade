"""Perplexity against measured KV reduction: SpecAttn, the oracle, Quest, Double Sparsity and
StreamingLLM on the same models, windows, protocol and attention path.

Writes `ppl_vs_kv.json` (every row), `ppl_vs_kv.md` (the paper's table) and
`ppl_vs_kv.png` (one curve per method) into --out-dir. While it runs, the rows so far are in
`ppl_vs_kv.partial.json` (a run cut short keeps them; `--merge` takes that file too).

    python benchmarks/ppl_vs_kv.py --out-dir benchmarks/results
    python benchmarks/ppl_vs_kv.py --quick ...   # a short excerpt, seconds (CI)

A sweep split over several runs (`--methods`, `--p-values`, ...) is joined into one report
by `--merge RUN.json ...`, and sweeps are drawn side by side on shared axes by
`--compare "LABEL=RUN.json" ... --plot FILE.png` (neither loads a model). A panel may join
runs as `LABEL=A.json+B.json`: A's rows, then B's rows of the methods A did not run, each
row's increase against its own run's dense perplexity. `B.json:quest,oracle` takes exactly
those methods' rows from B instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from specattn_jax.data import load_split_texts
from specattn_jax.eval import MethodFactory, PerplexityProtocol, make_windows
from specattn_jax.eval.methods import BUDGET_METHODS
from specattn_jax.eval.methods import METHODS as ALL_METHODS
from specattn_jax.eval.report import (
    compare_methods,
    markdown_table,
    merge_reports,
    plot_perplexity_vs_reduction,
    plot_relative_increase,
)
from specattn_jax.layer_map import LayerMap
from specattn_jax.loading import ASSETS, load_pretrained

P_VALUES = (0.8, 0.9, 0.95, 0.97, 0.99)
RECENT_P_VALUES = (0.5, 0.6, 0.7, 0.8, 0.9)
HISTORY_P_VALUES = (0.7, 0.8, 0.9)
BUDGETS = (0.1, 0.2, 0.3, 0.5)


# The sparse methods (dense runs first in every sweep).
METHODS = tuple(m for m in ALL_METHODS if m != "dense")


def settings(
    p_values, recent_p_values, budgets, methods=METHODS, history_p_values=HISTORY_P_VALUES
) -> list[tuple[str, float]]:
    """(method, p or budget) of each row, in the table's order, for the chosen methods."""
    rows = (
        [("specattn", p) for p in p_values]
        + [("specattn_recent", p) for p in recent_p_values]
        + [("specattn_history", p) for p in history_p_values]
        + [("oracle", p) for p in p_values]
        + [(m, b) for m in BUDGET_METHODS for b in budgets]
    )
    return [row for row in rows if row[0] in methods]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier", default="bundled:verifier")
    parser.add_argument("--draft", default="bundled:draft")
    parser.add_argument("--data-dir", help="corpus folder (default ../shared/data/gutenberg)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="the books scored: tune settings on validation, report them on test",
    )
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--num-windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--granularity", type=int, default=1)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument(
        "--recent-window", type=int, default=256, help="recent tokens specattn_recent reads"
    )
    parser.add_argument(
        "--layer-map",
        help="layer map JSON (default: the bundled map for the bundled pair, else one "
        "calibrated on 8 validation windows of up to 1024 tokens)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated methods to run (a long sweep can be split over several runs)",
    )
    parser.add_argument("--p-values", type=_floats, default=P_VALUES, help="specattn, oracle")
    parser.add_argument("--recent-p-values", type=_floats, default=RECENT_P_VALUES)
    parser.add_argument("--history-p-values", type=_floats, default=HISTORY_P_VALUES)
    parser.add_argument("--budgets", type=_floats, default=BUDGETS, help="the baselines' budgets")
    parser.add_argument("--quick", action="store_true", help="one short window, few settings")
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="RUN.json", help="join these runs' reports"
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="LABEL=RUN.json", help="sweeps to draw side by side"
    )
    parser.add_argument("--plot", type=Path, help="the PNG that --compare writes")
    args = parser.parse_args(argv)
    if args.merge:
        write_report(merge_reports([json.loads(f.read_text()) for f in args.merge]), args.out_dir)
        return 0
    if args.compare:
        if args.plot is None:
            parser.error("--compare needs --plot")
        panels = dict(item.split("=", 1) for item in args.compare)
        panels = {label: panel_rows(files) for label, files in panels.items()}
        print(f"wrote {plot_relative_increase(panels, args.plot)}")
        return 0
    methods = tuple(args.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.quick:
        args.window, args.prefix, args.num_windows, args.batch_size = 256, 128, 1, 1
        args.recent_window = 32
        p_values, recent_p_values, budgets = (0.9, 1.0), (0.5,), (0.3, 1.0)
        history_p_values = (0.9,)
    else:
        p_values, recent_p_values, budgets = args.p_values, args.recent_p_values, args.budgets
        history_p_values = args.history_p_values

    verifier, tokenizer = load_pretrained(args.verifier, jnp.float32)
    draft, _ = load_pretrained(args.draft, jnp.float32)
    windows = make_windows(
        tokenizer, load_split_texts(args.split, args.data_dir), args.window, args.num_windows
    )
    calibration = make_windows(
        tokenizer, load_split_texts("validation", args.data_dir), min(args.window, 1024), 8
    )
    bundled_map = ASSETS / "layer_map.json"
    layer_map = None
    if args.layer_map is not None:
        layer_map = LayerMap.load(args.layer_map)
    elif args.verifier == "bundled:verifier" and bundled_map.is_file():
        layer_map = LayerMap.load(bundled_map)
    factory = MethodFactory(
        draft,
        verifier,
        calibration,
        layer_map=layer_map,
        granularity=args.granularity,
        dense_layers=args.dense_layers,
        recent_window=args.recent_window,
    )
    protocol = PerplexityProtocol(
        window=args.window, prefix=args.prefix, gamma=args.gamma, batch_size=args.batch_size
    )
    layer_map = factory.get_layer_map()
    mix_note = (
        "."
        if layer_map.mix is None
        else ", with a layer mix (each sparse verifier layer selects from its fitted weighted "
        "mix of the draft layers' attention)."
    )
    caption = (
        f"Decode-time perplexity on {len(windows)} {args.split}-split windows of "
        f"{args.window} tokens ({args.prefix} prefilled densely, {protocol.scored_tokens} "
        f"scored per window), "
        f"gamma {args.gamma}, granularity {args.granularity} (Quest: pages of 16), first "
        f"{args.dense_layers} verifier layers dense; KV reduction measured from the entries "
        f"read. specattn_recent also reads 4 sink and the {args.recent_window} most recent "
        f"context tokens; specattn_history also reads the top-p set of each sparse layer's "
        f"attention in the last verify (the same p). "
        f"Layer map: {list(layer_map.mapping)}{mix_note}"
    )
    report = {
        "caption": caption,
        "device": str(jax.devices()[0].device_kind),
        "seconds": 0.0,
        "verifier": args.verifier,
        "draft": args.draft,
        "split": args.split,
        "window": args.window,
        "prefix": args.prefix,
        "gamma": args.gamma,
        "granularity": args.granularity,
        "dense_layers": args.dense_layers,
        "windows": len(windows),
        "rows": [],
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "ppl_vs_kv.partial.json"
    start = time.perf_counter()

    def keep(rows: list[dict]) -> None:
        report.update(rows=rows, seconds=time.perf_counter() - start)
        partial.write_text(json.dumps(report, indent=2) + "\n")

    rows = compare_methods(
        factory,
        windows,
        protocol,
        settings(p_values, recent_p_values, budgets, methods, history_p_values),
        progress=True,
        on_row=keep,
    )
    report.update(rows=rows, seconds=time.perf_counter() - start)
    write_report(report, out)
    partial.unlink()
    return 0


def panel_rows(files: str) -> list[dict]:
    """The rows of one --compare panel, "A.json+B.json+...": A's rows, then each later run's
    rows of the methods no earlier run has; a run written "B.json:m1,m2" gives the rows of
    methods m1 and m2 instead, whatever came before."""
    rows = []
    for part in files.split("+"):
        file, _, chosen = part.partition(":")
        run_rows = json.loads(Path(file).read_text())["rows"]
        if chosen:
            rows += [row for row in run_rows if row["method"] in chosen.split(",")]
        else:
            ran = {row["method"] for row in rows}
            rows += [row for row in run_rows if row["method"] not in ran]
    return rows


def write_report(report: dict, out_dir: str | Path) -> None:
    """`ppl_vs_kv.{json,md,png}` of a report in `out_dir`; prints the caption and table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl_vs_kv.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report["rows"])
    (out / "ppl_vs_kv.md").write_text(f"{report['caption']}\n\n{table}\n")
    plot_perplexity_vs_reduction(
        report["rows"], out / "ppl_vs_kv.png", title="Perplexity vs KV reduction"
    )
    print(report["caption"])
    print(table)
    print(
        f"({report['seconds']:.0f} s on {report['device']}; wrote {out}/ppl_vs_kv.{{json,md,png}})"
    )


if __name__ == "__main__":
    sys.exit(main())

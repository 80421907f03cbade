"""Comparing methods under one protocol: rows in the paper's shape, a markdown table, and a
plot of perplexity against measured KV reduction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from specattn_jax.errors import SpecAttnError
from specattn_jax.eval.methods import DRAFT_METHODS, METHODS, MethodFactory
from specattn_jax.eval.perplexity import PerplexityProtocol, decode_time_perplexity


def compare_methods(
    factory: MethodFactory,
    windows: np.ndarray,
    protocol: PerplexityProtocol,
    settings: Sequence[tuple[str, float | None]],
    *,
    backend: str = "auto",
    mesh: Mesh | None = None,
    progress: bool = False,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Runs dense first, then each (method, value); every row carries the perplexity
    increase over dense (absolute and relative) and the measured KV reduction. `mesh` as
    `decode_time_perplexity`'s. `on_row`, if given, is called with the rows so far after each
    row (to keep what a run cut short has measured)."""
    rows = []
    dense = None
    for method, value in [("dense", None), *[s for s in settings if s[0] != "dense"]]:
        result = decode_time_perplexity(
            factory.draft,
            factory.verifier,
            windows,
            protocol,
            factory.selector(method, value),
            backend=backend,
            mesh=mesh,
            progress=progress,
            label=f"perplexity, {method}" + ("" if value is None else f" {value}"),
        )
        dense = dense or result
        rows.append(
            {
                "method": method,
                "value": value,
                **result,
                "increase": result["perplexity"] - dense["perplexity"],
                "relative_increase": result["perplexity"] / dense["perplexity"] - 1,
            }
        )
        if on_row is not None:
            on_row(list(rows))
    return rows


# What must agree between runs of one sweep (the caption names the layer map).
PROTOCOL_FIELDS = (
    "caption", "verifier", "draft", "window", "prefix", "gamma", "granularity",
    "dense_layers", "windows",
)  # fmt: skip


def merge_reports(reports: Sequence[dict]) -> dict:
    """One sweep report from runs that split its settings (`ppl_vs_kv.py --methods ...`):
    the first run's fields, the seconds summed, dense once, then every run's other rows in
    `METHODS` order, each method's by ascending p or budget.

    The runs must share the protocol (`PROTOCOL_FIELDS`) and the same dense perplexity, to
    the bit; no setting may appear twice. Otherwise one `SpecAttnError` names the problem.
    """
    first = reports[0]
    for index, report in enumerate(reports[1:], start=1):
        for field in PROTOCOL_FIELDS:
            if report[field] != first[field]:
                raise SpecAttnError(f"run {index} differs from run 0 in {field}")
        if report["rows"][0] != first["rows"][0]:
            raise SpecAttnError(f"run {index} has another dense row than run 0")
    rows = sorted(
        (row for report in reports for row in report["rows"][1:]),
        key=lambda row: (METHODS.index(row["method"]), row["value"]),
    )
    rows = [first["rows"][0], *rows]
    settings = [(row["method"], row["value"]) for row in rows]
    repeated = sorted({s for s in settings if settings.count(s) > 1}, key=str)
    if repeated:
        raise SpecAttnError(f"settings run more than once: {repeated}")
    return {**first, "seconds": sum(r["seconds"] for r in reports), "rows": rows}


_KNOB = {method: "p" for method in (*DRAFT_METHODS, "oracle")}


def setting_label(row: dict) -> str:
    if row["value"] is None:
        return row["method"]
    return f"{row['method']} ({_KNOB.get(row['method'], 'budget')}={row['value']:g})"


def markdown_table(rows: Sequence[dict]) -> str:
    """The paper's table: method, perplexity, increase, relative increase, KV reduction."""
    lines = [
        "| method | perplexity | increase | relative increase | KV reduction |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {setting_label(row)} | {row['perplexity']:.3f} | {row['increase']:+.3f} | "
            f"{row['relative_increase']:+.2%} | {row['kv_reduction']:.1%} |"
        )
    return "\n".join(lines)


def plot_perplexity_vs_reduction(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """One curve per method: perplexity against measured KV reduction (dense as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    dense = [r for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0]["perplexity"], color="gray", linestyle="--", label="dense")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        points = sorted((r["kv_reduction"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_xlabel("measured KV reduction")
    ax.set_ylabel("perplexity")
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_relative_increase(panels: dict[str, Sequence[dict]], path: str | Path) -> Path:
    """Sweeps side by side on shared axes, one panel each (its title the dict key): the
    relative perplexity increase (symmetric log scale) against measured KV reduction, one
    curve per method, a method the same colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for rows in panels.values() for r in rows))
    methods = [m for m in methods if m != "dense"]
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 4.2), sharex=True, sharey=True, squeeze=False
    )
    for ax, (title, rows) in zip(axes[0], panels.items(), strict=True):
        for method in methods:
            points = sorted(
                (r["kv_reduction"], 100 * r["relative_increase"])
                for r in rows
                if r["method"] == method
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ms=4, color=colours[method],
                        label=method)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("measured KV reduction")
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity increase over dense (%)")
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(handles.values(), handles.keys(), loc="upper left", fontsize=8,
               bbox_to_anchor=(0.06, 0.9))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

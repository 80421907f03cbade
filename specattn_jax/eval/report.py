"""Comparing methods under one protocol: rows in the paper's shape, a markdown table, and a
plot of perplexity against measured KV reduction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from specattn_jax.eval.methods import MethodFactory
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
) -> list[dict]:
    """Runs dense first, then each (method, value); every row carries the perplexity
    increase over dense (absolute and relative) and the measured KV reduction. `mesh` as
    `decode_time_perplexity`'s."""
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
    return rows


_KNOB = {"specattn": "p", "specattn_recent": "p", "oracle": "p"}


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

"""`saejax frontier SWEEP_DIR`: every family of a sweep on one nmse-L0 frontier, with a table.

  saejax frontier DIR [--metric nmse] [--out DIR/frontier]

The comparison Gao et al. make between SAE families: held-out reconstruction
against measured sparsity (L0), one line per family through its runs, and a
table of nmse, L0, dead and dense fractions per run. Writes frontier.png,
frontier.md (a Markdown table for a README) and frontier.json into the out
directory (default SWEEP_DIR/frontier). `saejax fit` is for the scaling laws
of one family; this command is for comparing families.

At equal L0 the families are compared by interpolating each family's frontier
(log nmse against log L0, between its measured runs); `compare_at` does that.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from saejax.errors import ConfigError
from saejax.scaling import defaults
from saejax.scaling.table import SweepResults, load_results

OUT_SUBDIR = "frontier"
TABLE_COLUMNS = ("family", "sparsity", "nmse", "l0", "dead %", "dense %", "run")


def add_arguments(parser) -> None:
    parser.add_argument("sweep_dir", help="sweep directory written by `saejax sweep` (or its results.jsonl file)")
    parser.add_argument("--metric", default=defaults.METRIC, help="numeric column to plot against L0 (default nmse)")
    parser.add_argument("--out", default=None,
                        help=f"directory for frontier.png, frontier.md, frontier.json (default SWEEP_DIR/{OUT_SUBDIR})")


def frontier_points(results: SweepResults, metric: str = defaults.METRIC) -> dict[str, list[dict[str, Any]]]:
    """Family -> its runs as {l0, metric, dead, dense, sparsity, run}, sorted by L0."""
    values, l0 = results.column(metric), results.column("l0")
    dead, dense = results.column("dead_fraction"), _optional(results, "dense_fraction")
    by_family: dict[str, list[dict[str, Any]]] = {}
    for i, row in enumerate(results.runs):
        if not (math.isfinite(values[i]) and math.isfinite(l0[i])):
            continue
        control, value = row.get("sparsity_control"), row.get("sparsity_value")
        sparsity = f"{control}={value:g}" if isinstance(value, (int, float)) and control else f"k={row.get('k')}"
        by_family.setdefault(str(row.get("family") or "?"), []).append({
            "run": row.get("run"), "sparsity": sparsity, "l0": float(l0[i]), metric: float(values[i]),
            "dead_fraction": float(dead[i]), "dense_fraction": float(dense[i])})
    return {family: sorted(points, key=lambda p: p["l0"]) for family, points in sorted(by_family.items())}


def _optional(results: SweepResults, name: str) -> np.ndarray:
    return results.column(name) if results.has_column(name) else np.full(len(results), math.nan)


def compare_at(points: dict[str, list[dict[str, Any]]], l0: float, metric: str = defaults.METRIC) -> dict[str, float]:
    """Each family's metric at this L0, interpolated in log-log between its runs (NaN outside their range)."""
    compared = {}
    for family, runs in points.items():
        xs = np.log([p["l0"] for p in runs if p["l0"] > 0 and p[metric] > 0])
        ys = np.log([p[metric] for p in runs if p["l0"] > 0 and p[metric] > 0])
        inside = len(xs) >= 2 and xs.min() <= math.log(l0) <= xs.max()
        compared[family] = float(np.exp(np.interp(math.log(l0), xs, ys))) if inside else math.nan
    return compared


def _percent(value: float) -> str:
    return f"{100 * value:.1f}" if math.isfinite(value) else "-"


def table_rows(points: dict[str, list[dict[str, Any]]], metric: str = defaults.METRIC) -> list[tuple[str, ...]]:
    return [(family, p["sparsity"], f"{p[metric]:.4f}", f"{p['l0']:.1f}", _percent(p["dead_fraction"]),
             _percent(p["dense_fraction"]), str(p["run"])) for family, runs in points.items() for p in runs]


def format_markdown(points: dict[str, list[dict[str, Any]]], metric: str = defaults.METRIC) -> str:
    header = [c if c != "nmse" else metric for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(points, metric)]
    return "\n".join(lines) + "\n"


def format_text(points: dict[str, list[dict[str, Any]]], metric: str = defaults.METRIC) -> str:
    rows = [tuple(c if c != "nmse" else metric for c in TABLE_COLUMNS), *table_rows(points, metric)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def plot_family_frontier(points: dict[str, list[dict[str, Any]]], metric: str = defaults.METRIC, ax=None):
    """nmse against L0 (log-log), one line and colour per family."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if ax is None:
        figure = Figure(figsize=(6.4, 4.8), layout="constrained")
        ax = figure.add_subplot()
    colours = colormaps["tab10"]
    markers = "osD^vP*X<>"
    for i, (family, runs) in enumerate(points.items()):
        shown = [p for p in runs if p["l0"] > 0 and p[metric] > 0]
        ax.plot([p["l0"] for p in shown], [p[metric] for p in shown], "-", marker=markers[i % len(markers)],
                color=colours(i % 10), label=family, markersize=5, linewidth=1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("L0: mean active latents per token on held-out tokens (log scale)")
    ax.set_ylabel(f"held-out {metric} (log scale)")
    ax.set_title(f"{metric}-L0 frontier by SAE family")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(title="family", fontsize="small")
    return ax.figure


def main(args) -> int:
    from saejax.export import write_json_atomic, write_text_atomic

    results = load_results(args.sweep_dir, family=None, all_families=True)
    if not results.has_column(args.metric):
        raise ConfigError(f"{args.metric!r} is not a column of {results.path}")
    points = frontier_points(results, args.metric)
    if not points:
        raise ConfigError(f"no run in {results.path} has a finite {args.metric} and l0")
    out_dir = args.out or os.path.join(os.path.dirname(results.path), OUT_SUBDIR)
    os.makedirs(out_dir, exist_ok=True)
    print(format_text(points, args.metric))
    png = os.path.join(out_dir, "frontier.png")
    figure = plot_family_frontier(points, args.metric)
    figure.savefig(png + ".tmp.png", dpi=120)
    os.replace(png + ".tmp.png", png)
    write_text_atomic(os.path.join(out_dir, "frontier.md"), format_markdown(points, args.metric))
    write_json_atomic(os.path.join(out_dir, "frontier.json"), {"metric": args.metric, "families": points})
    print(f"\nwrote {png}, frontier.md and frontier.json in {out_dir}")
    return 0

"""The sweep's figures: loss against n (and k) with the fitted laws, the nmse-L0 frontier, dead latents.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no backend is
selected and no global figure state is kept, so the CLI writes PNGs through
Agg (what `Figure.savefig` uses for .png) on a headless machine, and a
notebook passes its own axes (`fig, ax = plt.subplots(); plot_frontier(results,
ax=ax)`) and shows them inline. Every function returns the Figure it drew on.

Points are individual runs (faint) and their mean over seeds (solid markers);
the curves are the fitted laws.
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from saejax.scaling.fit import Fit
from saejax.scaling.sweep_fit import DEFAULT_METRIC, SweepFit
from saejax.scaling.table import SweepResults, format_value, group_label

FIGURE_SIZE = (6.4, 4.8)
DPI = 120


def _axes(ax):
    if ax is None:
        figure = Figure(figsize=FIGURE_SIZE, layout="constrained")
        return figure, figure.add_subplot()
    return ax.figure, ax


def _colours(count: int) -> list:
    """Ordered colours (small to large k or n) that stay visible on white."""
    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, max(count, 1))]


def _fits(fits: SweepFit | Iterable[Fit] | None, law: str) -> dict[str, Fit]:
    if fits is None:
        return {}
    fits = fits.fits if isinstance(fits, SweepFit) else fits
    return {fit.group: fit for fit in fits if fit.law == law}


def _loss_against(results: SweepResults, fits, metric: str, x: str, fixed: str, ax) -> Figure:
    law = f"L({x})"
    figure, ax = _axes(ax)
    by_group = _fits(fits, law)
    xs, ys, groups = results.column(x), results.column(metric), results.column(fixed)
    means = results.mean_by((fixed, x), metric)
    values = results.values(fixed)
    for value, colour in zip(values, _colours(len(values)), strict=True):
        group = group_label(fixed, value)
        mask = (groups == value) & np.isfinite(ys) & (ys > 0)
        ax.scatter(xs[mask], ys[mask], color=colour, alpha=0.3, s=14, linewidths=0)
        grid = sorted((key[1], mean) for key, mean in means.items() if key[0] == value and mean > 0)
        fit = by_group.get(group)
        label = f"{group}: {x}^{fit.params['b']:.3g}" if fit else f"{group} (no fit)"
        if grid:
            ax.plot(*zip(*grid, strict=True), "o", color=colour, markersize=5, label=label)
        if fit is not None:
            curve_x = np.geomspace(xs[mask].min() / 1.2, xs[mask].max() * 1.2, 200)
            ax.plot(curve_x, fit.predict(curve_x), "-", color=colour, linewidth=1.2, alpha=0.9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"{'latents n' if x == 'n' else 'active latents k'} (log scale)")
    ax.set_ylabel(f"{metric} (log scale)")
    ax.set_title(f"{metric} against {x}; lines: L({x}) = a·{x}^b + c fitted per {fixed}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(title=f"{fixed} (fitted exponent b)", fontsize="small")
    return figure


def plot_loss_vs_n(results: SweepResults, fits: SweepFit | Iterable[Fit] | None = None, *,
                   metric: str = DEFAULT_METRIC, ax=None) -> Figure:
    """Loss against n (log-log), one colour per k, with the fitted L(n) curves."""
    return _loss_against(results, fits, metric, "n", "k", ax)


def plot_loss_vs_k(results: SweepResults, fits: SweepFit | Iterable[Fit] | None = None, *,
                   metric: str = DEFAULT_METRIC, ax=None) -> Figure:
    """Loss against k (log-log), one colour per n, with the fitted L(k) curves."""
    return _loss_against(results, fits, metric, "k", "n", ax)


def plot_frontier(results: SweepResults, *, metric: str = DEFAULT_METRIC, l0: str = "l0", ax=None) -> Figure:
    """The sparsity-reconstruction frontier: mean loss against mean L0, coloured by n, a line per n through its k."""
    figure, ax = _axes(ax)
    losses, sparsity = results.mean_by(("n", "k"), metric), results.mean_by(("n", "k"), l0)
    sizes = results.values("n")
    norm = LogNorm(vmin=min(sizes), vmax=max(sizes) if max(sizes) > min(sizes) else min(sizes) * 2)
    cmap = colormaps["viridis"]
    for n in sizes:
        points = sorted((key[1], sparsity[key], losses[key]) for key in losses
                        if key[0] == n and key in sparsity and sparsity[key] > 0 and losses[key] > 0)
        if not points:
            continue
        _, x, y = zip(*points, strict=True)
        ax.plot(x, y, "-o", color=cmap(norm(n)), markersize=5, linewidth=1.2)
    mappable = ax.scatter([], [], c=[], cmap=cmap, norm=norm)
    colourbar = figure.colorbar(mappable, ax=ax)
    colourbar.set_label("latents n")
    colourbar.ax.minorticks_off()
    ticks = sizes[:: max(1, math.ceil(len(sizes) / 8))]
    colourbar.set_ticks(ticks, labels=[format_value(n) for n in ticks])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"{l0}: mean active latents per token (log scale)")
    ax.set_ylabel(f"{metric} (log scale)")
    ax.set_title(f"{metric}-L0 frontier: one line per n through its k values")
    ax.grid(True, which="both", alpha=0.25)
    return figure


def plot_dead_vs_n(results: SweepResults, *, dead: str = "dead_fraction", ax=None) -> Figure:
    """Fraction of dead latents against n, one colour per k (linear y: it is often exactly 0)."""
    figure, ax = _axes(ax)
    xs, ys, ks = results.column("n"), results.column(dead), results.column("k")
    means = results.mean_by(("k", "n"), dead)
    values = results.values("k")
    for k, colour in zip(values, _colours(len(values)), strict=True):
        mask = (ks == k) & np.isfinite(ys)
        ax.scatter(xs[mask], ys[mask], color=colour, alpha=0.3, s=14, linewidths=0)
        grid = sorted((key[1], mean) for key, mean in means.items() if key[0] == k)
        if grid:
            ax.plot(*zip(*grid, strict=True), "-o", color=colour, markersize=5, linewidth=1.2,
                    label=group_label("k", k))
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("latents n (log scale)")
    ax.set_ylabel(f"{dead} (fraction of latents)")
    ax.set_title("dead latents against n, one line per k")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(title="k", fontsize="small")
    return figure


def _save(figure: Figure, path: str) -> None:
    tmp = f"{path}.tmp"
    figure.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)


def _has_values(results: SweepResults, column: str) -> bool:
    return results.has_column(column) and any(math.isfinite(v) for v in results.column(column))


def save_plots(results: SweepResults, sweep_fit: SweepFit, out_dir: str) -> tuple[list[str], list[str]]:
    """Write the figures as PNGs into out_dir; (paths written, notes on figures skipped for lack of data)."""
    metric = sweep_fit.metric
    figures = [("loss_vs_n.png", lambda: plot_loss_vs_n(results, sweep_fit, metric=metric), None)]
    if sweep_fit.by_law("L(k)"):
        figures.append(("loss_vs_k.png", lambda: plot_loss_vs_k(results, sweep_fit, metric=metric), None))
    figures.append(("frontier.png", lambda: plot_frontier(results, metric=metric), "l0"))
    figures.append(("dead_vs_n.png", lambda: plot_dead_vs_n(results), "dead_fraction"))
    written, notes = [], []
    for name, draw, needs in figures:
        if needs is not None and not _has_values(results, needs):
            notes.append(f"no {name}: the results have no {needs!r} values")
            continue
        path = os.path.join(out_dir, name)
        _save(draw(), path)
        written.append(path)
    return written, notes

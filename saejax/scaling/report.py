"""Fits as text: an aligned table for the terminal and a Markdown one for a README.

One row per (law, group, parameter), so a reader scans one exponent across
groups; how well each fit fits (RMS log residual, usable bootstrap
resamples) follows in a short summary.
"""

from __future__ import annotations

import math
from typing import Iterable

from saejax.scaling.fit import Fit
from saejax.scaling.sweep_fit import SweepFit

COLUMNS = ("law", "group", "parameter", "estimate", "CI low", "CI high", "points")


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "-"


def parameter_rows(fits: Iterable[Fit]) -> list[tuple[str, ...]]:
    """(law, group, parameter, estimate, CI low, CI high, points) as strings."""
    rows = []
    for fit in fits:
        for name, value in fit.params.items():
            low, high = fit.ci[name]
            rows.append((fit.law, fit.group, name, _number(value), _number(low), _number(high), str(fit.n_points)))
    return rows


def _summary_lines(fits: Iterable[Fit]) -> list[str]:
    return [f"{fit.law} at {fit.group}: {fit.formula}; {fit.n_points} points, RMS log residual "
            f"{_number(fit.rms_log_residual)}, {fit.n_bootstrap_used}/{fit.n_bootstrap} bootstrap refits"
            for fit in fits]


def format_table(fits: Iterable[Fit]) -> str:
    """Aligned text: numbers right-aligned, names left-aligned."""
    fits = list(fits)
    rows = [COLUMNS, *parameter_rows(fits)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = {3, 4, 5, 6}

    def line(row):
        return "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    out = [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in rows[1:]]
    return "\n".join(out)


def format_report(sweep_fit: SweepFit) -> str:
    """The terminal report: header, parameter table, per-fit summary."""
    header = (f"scaling-law fits of {sweep_fit.metric} over {sweep_fit.n_runs} runs "
              f"({sweep_fit.confidence:.0%} bootstrap CIs, {sweep_fit.n_bootstrap} resamples, seed {sweep_fit.seed})")
    return "\n".join([header, "", format_table(sweep_fit.fits), "", *_summary_lines(sweep_fit.fits)])


def format_markdown(sweep_fit: SweepFit) -> str:
    """A Markdown section to paste into a README."""
    lines = [
        f"Scaling-law fits of `{sweep_fit.metric}` over {sweep_fit.n_runs} runs of `{sweep_fit.source}` "
        f"({sweep_fit.confidence:.0%} percentile-bootstrap CIs from {sweep_fit.n_bootstrap} resamples, "
        f"seed {sweep_fit.seed}; robust least squares in log space).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join([":--"] * 3 + ["--:"] * 4) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in parameter_rows(sweep_fit.fits)]
    lines += ["", "| law | group | formula | points | RMS log residual | bootstrap refits |",
              "|:--|:--|:--|--:|--:|--:|"]
    lines += [f"| {fit.law} | {fit.group} | {fit.formula} | {fit.n_points} | {_number(fit.rms_log_residual)} | "
              f"{fit.n_bootstrap_used}/{fit.n_bootstrap} |" for fit in sweep_fit.fits]
    if sweep_fit.notes:
        lines += ["", *[f"- {note}" for note in sweep_fit.notes]]
    return "\n".join(lines) + "\n"

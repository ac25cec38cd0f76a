"""`saejax fit SWEEP_DIR`: fit the scaling laws to a sweep's results; print a table, write JSON, Markdown, PNGs.

  saejax fit DIR [--metric nmse] [--out DIR/fit] [--bootstrap 1000] [--confidence 0.95] [--seed 0]

DIR is a directory written by `saejax sweep` (or its results.jsonl). Into the
out directory go fit.json (every fit, machine readable), fit.md (a Markdown
table for a README) and loss_vs_n.png, loss_vs_k.png, frontier.png,
dead_vs_n.png.

The CLI builds its parser by importing this module, so scipy and matplotlib
are imported inside `main` only.
"""

from __future__ import annotations

import os
import sys

from saejax.errors import ConfigError
from saejax.scaling import defaults


def add_arguments(parser) -> None:
    parser.add_argument("sweep_dir", help="sweep directory written by `saejax sweep` (or its results.jsonl file)")
    parser.add_argument("--metric", default=defaults.METRIC,
                        help=f"numeric column(s) of results.jsonl to fit, comma-separated (default "
                             f"{defaults.METRIC}: held-out normalised MSE; e.g. train_nmse, or the evaluation's "
                             "ce_delta,probe_loss,kl_spliced: each then into OUT/METRIC)")
    parser.add_argument("--out", default=None,
                        help=f"directory for fit.json, fit.md and the PNGs (default SWEEP_DIR/{defaults.OUT_SUBDIR})")
    parser.add_argument("--bootstrap", type=int, default=defaults.BOOTSTRAP,
                        help=f"bootstrap resamples for the confidence intervals (default {defaults.BOOTSTRAP}; "
                             "0: no intervals)")
    parser.add_argument("--confidence", type=float, default=defaults.CONFIDENCE,
                        help=f"confidence level of the intervals (default {defaults.CONFIDENCE})")
    parser.add_argument("--family", default=None,
                        help="fit the runs of this SAE family (needed when the sweep trained several)")
    parser.add_argument("--seed", type=int, default=defaults.SEED,
                        help=f"seed of the bootstrap resampling (default {defaults.SEED}); same seed, same output")


def _check_arguments(args) -> None:
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0 (0 skips the confidence intervals), got {args.bootstrap}")
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must be between 0 and 1, e.g. 0.95, got {args.confidence}")


def _failed_note(failed: list[dict]) -> str:
    """E.g. "skipped 2 failed runs (a, b)": rows whose status is not "done" have no metrics to fit."""
    statuses: dict[str, list[str]] = {}
    for row in failed:
        statuses.setdefault(str(row.get("status")), []).append(str(row.get("run", "?")))
    parts = []
    for status, names in statuses.items():
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        parts.append(f"{len(names)} {status} {'run' if len(names) == 1 else 'runs'} ({listed})")
    return f"note: skipped {'; '.join(parts)}; see the error column of results.jsonl"


def main(args) -> int:
    from tqdm import tqdm

    from saejax.export import write_json_atomic, write_text_atomic
    from saejax.scaling.plots import save_plots
    from saejax.scaling.report import format_markdown, format_report
    from saejax.scaling.sweep_fit import fit_sweep
    from saejax.scaling.table import load_results

    _check_arguments(args)
    results = load_results(args.sweep_dir, family=args.family)
    out_dir = args.out or os.path.join(os.path.dirname(results.path), defaults.OUT_SUBDIR)
    if results.failed:
        print(_failed_note(results.failed))
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    for metric in metrics:
        # One metric writes into out_dir itself; several, each into out_dir/METRIC.
        target = out_dir if len(metrics) == 1 else os.path.join(out_dir, metric)
        if len(metrics) > 1:
            print(f"\n== {metric} ==")
        # Shown only on a terminal, and only if the bootstrap takes more than a couple of seconds.
        bar = tqdm(desc="bootstrap refits", unit="fit", delay=2, disable=None, file=sys.stderr, leave=False)
        try:
            sweep_fit = fit_sweep(results, metric=metric, n_bootstrap=args.bootstrap,
                                  confidence=args.confidence, seed=args.seed,
                                  progress=bar.update, on_plan=lambda total: bar.reset(total=total))
        finally:
            bar.close()
        for note in sweep_fit.notes:
            print(f"note: {note}")
        print(format_report(sweep_fit))

        os.makedirs(target, exist_ok=True)
        json_path, markdown_path = os.path.join(target, "fit.json"), os.path.join(target, "fit.md")
        write_json_atomic(json_path, sweep_fit.as_dict())
        write_text_atomic(markdown_path, format_markdown(sweep_fit))
        plots, plot_notes = save_plots(results, sweep_fit, target)
        for note in plot_notes:
            print(f"note: {note}")
        print(f"\nwrote {json_path}, {markdown_path}")
        print("plots: " + ", ".join(plots))
    return 0

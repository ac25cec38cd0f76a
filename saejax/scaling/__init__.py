"""Scaling laws of SAE loss in n (latents) and k (active latents), fitted to a sweep's results.

For a notebook:

    from saejax.scaling import load_results, fit_sweep, format_table, plot_loss_vs_n
    results = load_results("runs/minilm_sweep")       # DIR or DIR/results.jsonl
    sweep_fit = fit_sweep(results, metric="nmse")     # every law the sweep supports
    print(format_table(sweep_fit.fits))
    fit = sweep_fit.get("L(n)", "k=32"); fit.params["b"], fit.ci["b"], fit.predict(65536)

Public names:
  load_results(path) -> SweepResults       finished runs (.runs), failed ones (.failed), .column(name)
  fit_power_law(x, y, variable="n"|"k")    L(x) = a·x^b + c, a > 0, c >= 0
  fit_joint_law(n, k, y)                   L(n,k) = exp(α + β_k·log k + β_n·log n + γ·log k·log n)
                                                    + exp(ζ + η·log k)
      both -> Fit: .params {name: estimate}, .ci {name: (low, high)}, .predict(x) / .predict(n, k),
      .n_points, .rms_log_residual, .as_dict(); keyword arguments n_bootstrap=1000, confidence=0.95,
      seed=0, loss="soft_l1", f_scale=0.05, group, metric, labels (run names for error messages)
  fit_law(law, X, y)                       the same for any law in LAWS ("L(n)", "L(k)", "L(n,k)")
  fit_sweep(results, metric="nmse", n_bootstrap=1000, confidence=0.95, seed=0) -> SweepFit
      L(n) per k, L(k) per n, the joint law; groups with too few points skipped (.notes);
      .fits, .get(law, group), .by_law(law), .as_dict()
  format_table(fits), format_report(sweep_fit), format_markdown(sweep_fit)
  plot_loss_vs_n, plot_loss_vs_k, plot_frontier, plot_dead_vs_n (results, [fits], ax=None) -> Figure
  save_plots(results, sweep_fit, out_dir) -> (paths, notes)

Fits are robust least squares on log L_pred - log L_obs with percentile-bootstrap
CIs (see saejax.scaling.fit). Bad input raises saejax.errors.ConfigError or
DataError with a message saying what to do. The command line is `saejax fit DIR`
(saejax.scaling.command).

Names are imported on first use, so `import saejax.scaling.command` (which the
CLI does to build its parser) does not pull in scipy and matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_results": "table", "resolve_results_path": "table", "SweepResults": "table",
    "Fit": "fit", "fit_law": "fit", "fit_power_law": "fit", "fit_joint_law": "fit",
    "FitFailedError": "fit", "InsufficientDataError": "fit",
    "LAWS": "laws", "get_law": "laws", "PowerLaw": "laws", "JointLaw": "laws",
    "fit_sweep": "sweep_fit", "SweepFit": "sweep_fit",
    "format_table": "report", "format_report": "report", "format_markdown": "report",
    "plot_loss_vs_n": "plots", "plot_loss_vs_k": "plots", "plot_frontier": "plots", "plot_dead_vs_n": "plots",
    "save_plots": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'saejax.scaling' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"saejax.scaling.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

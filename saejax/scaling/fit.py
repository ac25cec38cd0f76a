"""Robust least squares in log space, with percentile-bootstrap confidence intervals.

Why robust: one bad run (a diverged seed, a run cut short) should not drag an
exponent fitted to a handful of points. `scipy.optimize.least_squares` with
`loss="soft_l1"` weighs residuals quadratically up to `f_scale` and linearly
beyond it; the default f_scale of 0.05 (5 % in log space) is above the
seed-to-seed noise of a sweep, so well-behaved points are fitted as by plain
least squares while an outlier that is off by a factor of 2 pulls far less.

Why bootstrap: the laws are nonlinear and fitted to few points, so
asymptotic standard errors are unreliable. Points are resampled with
replacement (seeded, so the output is reproducible), each resample is refitted
from the full-data optimum (one start is enough there, and it keeps 1000
refits to about a second), resamples that cannot determine the law (too few
distinct inputs) are skipped, and the CI is the percentile interval of the
refitted parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import least_squares

from saejax.errors import ConfigError
from saejax.scaling import defaults
from saejax.scaling.laws import get_law

DEFAULT_BOOTSTRAP = defaults.BOOTSTRAP
DEFAULT_CONFIDENCE = defaults.CONFIDENCE
DEFAULT_LOSS = "soft_l1"
DEFAULT_F_SCALE = 0.05
# A resample that cannot pin down a parameter (the joint law's floor, say) lets
# the optimiser crawl along a flat valley for hundreds of evaluations while the
# cost no longer changes; typical refits take 5-30. Stopping there keeps the
# bootstrap fast; the crawl is along a direction the data does not constrain,
# which the CI of that parameter shows as wide either way.
BOOTSTRAP_MAX_NFEV = 200


class InsufficientDataError(ConfigError):
    """Too few points or distinct inputs for a law."""


class FitFailedError(ConfigError):
    """No starting point converged (a sweep skips that group instead of stopping)."""


@dataclasses.dataclass(frozen=True)
class Fit:
    """One fitted law: estimates, bootstrap CIs and how well it fits.

    `group` names the subset it was fitted to ("k=8" for an L(n) fit at k=8,
    "all" for the joint law). `n_bootstrap_used` counts the resamples that
    could be refitted (degenerate ones are skipped).
    """

    law: str
    formula: str
    group: str
    metric: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_points: int
    rms_log_residual: float
    confidence: float
    n_bootstrap: int
    n_bootstrap_used: int
    seed: int

    def predict(self, *x) -> np.ndarray:
        """The fitted loss at x (L(n), L(k)) or at (n, k) (the joint law)."""
        return get_law(self.law).predict(self.params, *x)

    def as_dict(self) -> dict:
        """JSON-ready (NaN, e.g. a CI without bootstrap samples, becomes None)."""
        return {
            "law": self.law,
            "formula": self.formula,
            "group": self.group,
            "metric": self.metric,
            "params": {name: _json_float(v) for name, v in self.params.items()},
            "ci": {name: [_json_float(lo), _json_float(hi)] for name, (lo, hi) in self.ci.items()},
            "points": self.n_points,
            "rms_log_residual": _json_float(self.rms_log_residual),
            "confidence": self.confidence,
            "bootstrap": {"requested": self.n_bootstrap, "used": self.n_bootstrap_used, "seed": self.seed},
        }


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def check_losses(y: np.ndarray, *, metric: str, labels: Sequence[str]) -> None:
    """Refuse non-positive or non-finite losses, naming the runs: log space needs L > 0."""
    bad = [i for i, v in enumerate(y) if not (math.isfinite(v) and v > 0)]
    if not bad:
        return
    listed = ", ".join(f"{labels[i]} has {metric}={y[i]:g}" for i in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    noun = "run" if len(bad) == 1 else "runs"
    raise ConfigError(f"log-space fitting needs positive losses; {noun} {listed}{more}: "
                      "rerun or remove them (a run that failed should be marked status \"failed\")")


def _check_inputs(X: np.ndarray, names: Sequence[str], labels: Sequence[str]) -> None:
    for column, name in enumerate(names):
        bad = [i for i, v in enumerate(X[:, column]) if not (math.isfinite(v) and v > 0)]
        if bad:
            i = bad[0]
            raise ConfigError(f"{name} must be a positive number for a log-log fit; "
                              f"{labels[i]} has {name}={X[i, column]:g}")


def _solve(law, theta0: np.ndarray, F: np.ndarray, log_y: np.ndarray, bounds, loss: str, f_scale: float,
           max_nfev: int | None = None):
    theta0 = np.clip(theta0, *bounds)  # on a bound is feasible; trf moves strictly inside itself
    return least_squares(
        lambda theta: law.log_model(theta, F) - log_y, theta0,
        jac=lambda theta: law.jacobian(theta, F),
        bounds=bounds, loss=loss, f_scale=f_scale, method="trf", max_nfev=max_nfev)


def _best_fit(law, starts, F, log_y, bounds, loss, f_scale):
    best = None
    for theta0 in starts:
        if not np.all(np.isfinite(theta0)):
            continue
        try:
            result = _solve(law, theta0, F, log_y, bounds, loss, f_scale)
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(result.x)) and math.isfinite(result.cost) and (best is None or result.cost < best.cost):
            best = result
    return best


def fit_law(law, X, y, *, group: str = "all", metric: str = "loss", labels: Sequence[str] | None = None,
            n_bootstrap: int = DEFAULT_BOOTSTRAP, confidence: float = DEFAULT_CONFIDENCE, seed: int = defaults.SEED,
            loss: str = DEFAULT_LOSS, f_scale: float = DEFAULT_F_SCALE,
            progress: Callable[[int], None] | None = None) -> Fit:
    """Fit `law` to points X (one column per law input) with losses y; see the module docstring.

    `labels` name the points in error messages (run names); `progress(1)` is
    called after each bootstrap resample.
    """
    y = np.asarray(y, dtype=float).ravel()
    X = np.asarray(X, dtype=float)
    X = X.reshape(-1, 1) if X.ndim == 1 else X
    if len(X) != len(y):
        raise ConfigError(f"{len(X)} inputs but {len(y)} losses: give one loss per point")
    labels = list(labels) if labels is not None else [f"point {i}" for i in range(len(y))]
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    if n_bootstrap < 0:
        raise ConfigError(f"the number of bootstrap samples must be >= 0, got {n_bootstrap}")
    check_losses(y, metric=metric, labels=labels)
    _check_inputs(X, law.inputs, labels)
    where = "" if group == "all" else f" at {group}"
    reason = law.requirement(X)
    if reason:
        raise InsufficientDataError(f"cannot fit {law.formula}{where}: {reason} "
                                    "(add runs at more sizes, or more seeds)")

    centre = law.centre(X)
    F, log_y = law.features(X, centre), np.log(y)
    bounds = law.bounds(log_y)
    best = _best_fit(law, law.starts(F, log_y), F, log_y, bounds, loss, f_scale)
    if best is None:
        raise FitFailedError(f"the fit of {law.formula}{where} did not converge from any starting point; "
                             "look for runs whose loss does not follow the trend")
    estimate = law.to_params(best.x, centre)[0]
    residual = law.log_model(best.x, F) - log_y

    samples = _bootstrap(law, X, F, log_y, best.x, centre, bounds, n_bootstrap, seed, loss, f_scale, progress)
    alpha = (1.0 - confidence) / 2.0
    if len(samples):
        low, high = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
    else:
        low = high = np.full(len(law.param_names), np.nan)
    return Fit(
        law=law.name, formula=law.formula, group=group, metric=metric,
        params={name: float(v) for name, v in zip(law.param_names, estimate, strict=True)},
        ci={name: (float(lo), float(hi)) for name, lo, hi in zip(law.param_names, low, high, strict=True)},
        n_points=len(y), rms_log_residual=float(np.sqrt(np.mean(residual ** 2))),
        confidence=confidence, n_bootstrap=n_bootstrap, n_bootstrap_used=len(samples), seed=seed)


def _bootstrap(law, X, F, log_y, theta_hat, centre, bounds, n_bootstrap, seed, loss, f_scale,
               progress) -> np.ndarray:
    """Parameters refitted on resampled points (one row per usable resample), in reported units.

    The resamples keep the full data's centring and bounds, so every refit is
    the same problem as the full fit restricted to other points.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_bootstrap):
        index = rng.integers(0, len(log_y), len(log_y))
        if law.requirement(X[index]) is None:
            try:
                result = _solve(law, theta_hat, F[index], log_y[index], bounds, loss, f_scale, BOOTSTRAP_MAX_NFEV)
            except (ValueError, FloatingPointError):
                result = None
            if result is not None and np.all(np.isfinite(result.x)):
                rows.append(result.x)
        if progress is not None:
            progress(1)
    if not rows:
        return np.empty((0, len(law.param_names)))
    return law.to_params(np.array(rows), centre)


def fit_power_law(x, y, *, variable: str = "n", **kwargs) -> Fit:
    """Fit L(x) = a·x^b + c (a > 0, c >= 0) to losses y at sizes x; `variable` is "n" or "k".

    Keyword arguments as for `fit_law` (group, metric, labels, n_bootstrap,
    confidence, seed, loss, f_scale, progress). Raises ConfigError for too
    few points or non-positive/non-finite losses.
    """
    if variable not in ("n", "k"):
        raise ConfigError(f"variable must be 'n' or 'k', got {variable!r}")
    x = np.asarray(x, dtype=float)
    return fit_law(get_law(f"L({variable})"), x.reshape(-1, 1), y, **kwargs)


def fit_joint_law(n, k, y, **kwargs) -> Fit:
    """Fit the joint law L(n,k) of Gao et al. to losses y at latents n and sparsity k.

    Keyword arguments as for `fit_law`.
    """
    X = np.column_stack([np.asarray(n, dtype=float), np.asarray(k, dtype=float)])
    return fit_law(get_law("L(n,k)"), X, y, **kwargs)


__all__ = ["Fit", "FitFailedError", "InsufficientDataError", "check_losses", "fit_joint_law", "fit_law",
           "fit_power_law"]

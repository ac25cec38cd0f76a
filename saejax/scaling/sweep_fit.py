"""Every law a sweep can support: L(n) per k, L(k) per n, and the joint L(n,k).

A sweep is rarely a full grid with enough seeds everywhere, so a group that
is too small for its law (say k=128 run at two sizes only) is skipped with a
note rather than stopping the whole fit; only when no law at all can be
fitted is that an error. Losses are checked once, up front, for every run:
a non-positive or NaN loss is a broken run that the user should look at,
not a point to drop silently.

Each fit uses the same `seed`, so a fit here equals calling `fit_power_law` /
`fit_joint_law` directly on that group's points (in file order) with that seed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from saejax.errors import ConfigError
from saejax.scaling import defaults
from saejax.scaling.fit import (DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE, Fit, FitFailedError, check_losses,
                                fit_joint_law, fit_power_law)
from saejax.scaling.laws import get_law
from saejax.scaling.table import SweepResults, group_label

DEFAULT_METRIC = defaults.METRIC


@dataclasses.dataclass(frozen=True)
class SweepFit:
    """All fits of one sweep, and notes on what was skipped and why."""

    source: str
    metric: str
    fits: list[Fit]
    notes: list[str]
    n_runs: int
    n_failed: int
    confidence: float
    n_bootstrap: int
    seed: int

    def get(self, law: str, group: str = "all") -> Fit | None:
        """The fit of `law` ("L(n)", "L(k)", "L(n,k)") for `group` ("k=8", "n=1024", "all"), if there is one."""
        return next((fit for fit in self.fits if fit.law == law and fit.group == group), None)

    def by_law(self, law: str) -> list[Fit]:
        return [fit for fit in self.fits if fit.law == law]

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "metric": self.metric,
            "runs": self.n_runs,
            "failed_runs_skipped": self.n_failed,
            "confidence": self.confidence,
            "bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "notes": list(self.notes),
            "fits": [fit.as_dict() for fit in self.fits],
        }


def plan_fits(results: SweepResults) -> tuple[list[tuple[str, str, SweepResults]], list[str]]:
    """(law, group, runs) for every law the sweep can support, and a note for every group it cannot."""
    planned, notes = [], []
    for law_name, fixed, free in (("L(n)", "k", "n"), ("L(k)", "n", "k")):
        law = get_law(law_name)
        for value in results.values(fixed):
            group = group_label(fixed, value)
            subset = results.select(**{fixed: value})
            reason = law.requirement(subset.column(free).reshape(-1, 1))
            if reason:
                notes.append(f"skipped {law_name} at {group}: {reason}")
            else:
                planned.append((law_name, group, subset))
    joint = get_law("L(n,k)")
    reason = joint.requirement(np.column_stack([results.column("n"), results.column("k")]))
    if reason:
        notes.append(f"skipped the joint law L(n,k): {reason}")
    else:
        planned.append(("L(n,k)", "all", results))
    return planned, notes


def fit_sweep(results: SweepResults, *, metric: str = DEFAULT_METRIC, n_bootstrap: int = DEFAULT_BOOTSTRAP,
              confidence: float = DEFAULT_CONFIDENCE, seed: int = defaults.SEED,
              progress: Callable[[int], None] | None = None, on_plan: Callable[[int], None] | None = None) -> SweepFit:
    """Fit every law the sweep supports to `metric` (a numeric column, nmse by default).

    `on_plan(total)` is told the number of bootstrap refits ahead (for a
    progress bar); `progress(1)` is called after each.
    """
    check_losses(results.column(metric), metric=metric, labels=results.labels)
    planned, notes = plan_fits(results)
    notes = [*results.notes, *notes]
    if not planned:
        raise ConfigError(f"no scaling law can be fitted to {results.path}: " + "; ".join(notes)
                          + ". Run more sizes or seeds (L(n) needs 4 runs at 3 sizes n for one k)")
    if on_plan is not None:
        on_plan(len(planned) * n_bootstrap)
    options = dict(metric=metric, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed, progress=progress)
    fits = []
    for law, group, subset in planned:
        try:
            if law == "L(n,k)":
                fit = fit_joint_law(subset.column("n"), subset.column("k"), subset.column(metric),
                                    group=group, labels=subset.labels, **options)
            else:
                variable = "n" if law == "L(n)" else "k"
                fit = fit_power_law(subset.column(variable), subset.column(metric), variable=variable,
                                    group=group, labels=subset.labels, **options)
        except FitFailedError as e:
            notes.append(f"skipped {law} at {group}: {e}")
            continue
        fits.append(fit)
    if not fits:
        raise ConfigError(f"no scaling law could be fitted to {results.path}: " + "; ".join(notes))
    return SweepFit(source=results.path, metric=metric, fits=fits, notes=notes, n_runs=len(results),
                    n_failed=len(results.failed), confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)

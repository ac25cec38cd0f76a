"""A sweep's results: the rows of `DIR/results.jsonl` that `saejax sweep` writes.

One JSON object per line, one row per run (its n, k, seed, status, held-out
nmse, L0, dead fraction, ...). Failed rows are kept apart (their metrics are
null) so the fit can say how many it skipped. If a run appears more than once
(rerun after a failure), its last row wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from saejax.errors import ConfigError, DataError

RESULTS_FILE = "results.jsonl"


def resolve_results_path(path: str) -> str:
    """DIR or DIR/results.jsonl -> the results file; a clear error if there is none."""
    candidate = path if path.endswith(".jsonl") else os.path.join(path, RESULTS_FILE)
    if os.path.isfile(candidate):
        return candidate
    where = os.path.dirname(candidate) or "."
    raise ConfigError(f"no {RESULTS_FILE} in {where}: run `saejax sweep STUDY --workdir {where}` first")


def format_value(value: float) -> str:
    """A grid value as people write it: 1048576, not 1.04858e+06; 0.5 stays 0.5."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def group_label(column: str, value: float) -> str:
    """How a fit names the runs it was fitted to, e.g. "k=8"."""
    return f"{column}={format_value(value)}"


def _number(value: Any) -> float:
    """A metric as a float: null and non-numbers become NaN (JSON writers store NaN as "nan")."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclasses.dataclass(frozen=True)
class SweepResults:
    """Finished runs (`runs`) and failed ones (`failed`), in file order."""

    path: str
    runs: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    notes: tuple[str, ...] = ()  # how the table was read, e.g. which runs' k axis is their measured L0

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def labels(self) -> list[str]:
        """Run names, for messages."""
        return [str(row.get("run", f"row {i}")) for i, row in enumerate(self.runs)]

    def has_column(self, name: str) -> bool:
        return any(name in row for row in self.runs)

    def numeric_columns(self) -> list[str]:
        names = {key for row in self.runs for key, value in row.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return sorted(names)

    def column(self, name: str) -> np.ndarray:
        """Values of `name` over the finished runs as floats (NaN where null or missing)."""
        if not self.has_column(name):
            raise ConfigError(f"{name!r} is not a column of {self.path}; numeric columns there: "
                              f"{', '.join(self.numeric_columns()) or 'none'}")
        return np.array([_number(row.get(name)) for row in self.runs], dtype=float)

    def values(self, name: str) -> list[float]:
        """Distinct finite values of a column, ascending (e.g. the sweep's n grid)."""
        column = self.column(name)
        return sorted({float(v) for v in column if math.isfinite(v)})

    def select(self, **where: float) -> SweepResults:
        """The finished runs whose columns equal the given values, e.g. select(k=8)."""
        rows = [row for row in self.runs if all(_number(row.get(key)) == float(value) for key, value in where.items())]
        return SweepResults(self.path, rows, [], self.notes)

    def mean_by(self, keys: tuple[str, ...], name: str) -> dict[tuple[float, ...], float]:
        """Mean of a column over runs (seeds) sharing the values of `keys`; NaNs ignored, all-NaN groups left out."""
        groups: dict[tuple[float, ...], list[float]] = {}
        columns = [self.column(key) for key in keys]
        for i, value in enumerate(self.column(name)):
            if math.isfinite(value):
                groups.setdefault(tuple(float(c[i]) for c in columns), []).append(value)
        return {key: float(np.mean(values)) for key, values in sorted(groups.items())}


def load_results(path: str, family: str | None = None, all_families: bool = False) -> SweepResults:
    """Read a sweep's results (DIR or a results.jsonl file); refuse a file with no finished runs.

    Scaling laws describe one family: with runs of several families in the file,
    `family` selects one (an error names them if it is not given), unless
    `all_families` (for comparisons across families, e.g. the frontier).
    """
    path = resolve_results_path(path)
    rows: dict[str, dict[str, Any]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"line {number} of {path} is not valid JSON ({e}): "
                                "rerun `saejax sweep` to rewrite the results, or delete the line") from None
            if not isinstance(row, dict):
                raise DataError(f"line {number} of {path} is not a JSON object; each line must describe one run")
            rows[str(row.get("run", f"line {number}"))] = row
    present = sorted({str(row.get("family") or "topk") for row in rows.values()})
    if family is not None:
        if family not in present:
            raise ConfigError(f"no runs of family {family!r} in {path}; its families: {', '.join(present)}")
        rows = {name: row for name, row in rows.items() if str(row.get("family") or "topk") == family}
    elif len(present) > 1 and not all_families:
        raise ConfigError(f"{path} holds runs of several families ({', '.join(present)}); scaling laws are "
                          "fitted to one family at a time: pass --family NAME (`saejax frontier` compares them)")
    runs = [row for row in rows.values() if row.get("status", "done") == "done"]
    failed = [row for row in rows.values() if row.get("status", "done") != "done"]
    if not runs:
        detail = f"{len(failed)} failed" if failed else "it is empty"
        first_error = next((row.get("error") for row in failed if row.get("error")), None)
        hint = f" (first error: {first_error})" if first_error else ""
        raise DataError(f"no finished runs in {path}: {detail}{hint}; "
                        "fix the cause and run `saejax sweep STUDY --workdir DIR` again")
    missing = [str(row.get("run", "?")) for row in runs if not math.isfinite(_number(row.get("n")))]
    if missing:
        raise DataError(f"run {missing[0]} in {path} has no numeric 'n': every row needs n")
    runs, notes = _k_axis(runs, path)
    return SweepResults(path, runs, failed, notes)


def _k_axis(runs: list[dict[str, Any]], path: str) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The k of each run: the one its family declares, else its measured L0 (said in a note)."""
    by_family: dict[str, int] = {}
    placed = []
    for row in runs:
        if math.isfinite(_number(row.get("k"))):
            placed.append(row)
            continue
        l0 = _number(row.get("l0"))
        if not math.isfinite(l0):
            raise DataError(f"run {row.get('run', '?')} in {path} has neither a numeric 'k' nor a measured "
                            "'l0': every row needs n and one of them")
        family = str(row.get("family") or "?")
        by_family[family] = by_family.get(family, 0) + 1
        placed.append({**row, "k": l0, "k_source": "measured l0"})
    notes = tuple(f"{count} run(s) of family {family!r}, which declares no k, are placed on the k axis at "
                  f"their measured L0" for family, count in sorted(by_family.items()))
    return placed, notes

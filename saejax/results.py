"""What a run leaves in its workdir besides checkpoints: metrics.jsonl and results.json."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax

from saejax.errors import write_failed
from saejax.export import write_json_atomic

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


def _clean(value: Any) -> Any:
    """JSON-safe float (NaN/inf written as strings so the file stays valid JSON)."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Appends one JSON row per logged step; on resume drops rows past the restored step.

    Rows after the last checkpoint were computed by a run that died; the
    resumed run recomputes them, so keeping them would duplicate steps.
    """

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        try:
            if os.path.exists(self.path):
                kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(row) + "\n" for row in kept)
                os.replace(tmp, self.path)
            self._file = open(self.path, "a")
        except OSError as e:
            raise self._failed(e) from None

    def _failed(self, error: OSError):
        return write_failed("metrics to", self.path, error, "The checkpoints are intact: free space there "
                            "and run the same command to resume.")

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps({k: _clean(v) if isinstance(v, float) else v for k, v in row.items()}) + "\n")
            self._file.flush()
        except OSError as e:
            raise self._failed(e) from None

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            try:
                self._file.close()
            except OSError:  # the failed flush was reported by write()
                pass


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a torn last line from a killed process is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_results(workdir: str, results: Mapping[str, Any]) -> str:
    path = os.path.join(workdir, RESULTS_FILE)
    if jax.process_index() == 0:
        write_json_atomic(path, dict(results))
    return path


def read_results(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)

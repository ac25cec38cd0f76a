"""The sweep-level table: one row per grid point that finished or failed.

The table is derived, never appended to: it is rebuilt from the run
directories (results.json, failure.json) and replaced atomically after every
run. A killed runner therefore cannot leave a duplicate or half-written row,
and runs finished by other processes (SLURM array tasks) appear in it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
from typing import Any, Iterator, Sequence

from saejax.config import active_tree
from saejax.export import write_json_atomic, write_text_atomic
from saejax.results import read_results
from saejax.sweep.study import RunSpec

TABLE_JSONL = "results.jsonl"
TABLE_CSV = "results.csv"
FAILURE_FILE = "failure.json"
RUN_CONFIG_FILE = "config.json"
# The evaluation's headline figures (saejax.evaluation), null where a run skipped them.
EVAL_COLUMNS = ("loss_recovered", "ce_delta", "ce_spliced", "ce_clean", "kl_spliced", "probe_loss",
                "ablation_sparsity", "explain_f1")
COLUMNS = ("run", "status", "family", "n", "k", "sparsity_control", "sparsity_value", "seed", "tokens", "steps",
           "nmse", "train_nmse", "l0", "dead_fraction", "dense_fraction", "explained_variance",
           *EVAL_COLUMNS, "flops", "wall_time_s", "config_hash", "error", "run_dir", "point")


def finished(spec: RunSpec) -> dict[str, Any] | None:
    """The run's results.json if it trained all of train.steps, else None."""
    results = read_results(spec.run_dir)
    if results and results.get("steps") == int(spec.config.train.steps):
        return results
    return None


def failure(spec: RunSpec) -> dict[str, Any] | None:
    path = os.path.join(spec.run_dir, FAILURE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def record_failure(run_dir: str, error: str, kind: str, exit_code: int) -> None:
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, FAILURE_FILE), {"error": error, "type": kind, "exit_code": exit_code})


def clear_failure(run_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, FAILURE_FILE))


def declared_sparsity(config) -> dict[str, Any]:
    """What a run's family declares as its sparsity control, from its config (results.json has it too)."""
    from saejax.models import FAMILIES

    family = FAMILIES[config.sae.family]
    key = family.sparsity_key
    return {"name": key, "value": config.sae[config.sae.family][key], "is_k": family.has_k}


def _sparsity_columns(control: dict[str, Any]) -> dict[str, Any]:
    return {"sparsity_control": control["name"], "sparsity_value": control["value"],
            "k": int(control["value"]) if control.get("is_k") else None}


def _row(spec: RunSpec, workdir: str) -> dict[str, Any] | None:
    config = spec.config
    row: dict[str, Any] = {column: None for column in COLUMNS}
    row.update(run=spec.name, family=config.sae.family, n=int(config.sae.n), seed=int(config.seed),
               config_hash=spec.config_hash, point=spec.point, run_dir=os.path.relpath(spec.run_dir, workdir),
               **_sparsity_columns(declared_sparsity(config)))
    results = finished(spec)
    if results is not None:
        # The row reports what the run declared and measured (results.json), not today's config.
        train = results.get("final_train_metrics") or {}
        held_out = results.get("eval_metrics") or {}
        saved = active_tree(results.get("config") or {}).get("sae", {})
        control = results.get("sparsity_control")
        if control is None and "k" in saved:  # a TopK run written before results declared their control
            control = {"name": "k", "value": saved["k"], "is_k": True}
        if control is not None:
            row.update(_sparsity_columns(control))
        row.update(status="done", family=results.get("family", saved.get("family", row["family"])),
                   tokens=results["tokens_seen"], steps=results["steps"],
                   nmse=held_out.get("nmse", train.get("nmse")), train_nmse=train.get("nmse"),
                   l0=results.get("l0", held_out.get("l0", train.get("l0"))),
                   dead_fraction=train.get("dead_fraction"),
                   dense_fraction=held_out.get("dense_fraction", train.get("dense_fraction")),
                   explained_variance=held_out.get("explained_variance"),
                   flops=results.get("total_flops"), wall_time_s=results.get("wall_time_s"),
                   **{key: held_out.get(key) for key in EVAL_COLUMNS})
        return row
    failed = failure(spec)
    if failed is not None:
        row.update(status="failed", error=failed["error"], steps=int(config.train.steps))
        return row
    return None


def rows(specs: Sequence[RunSpec], workdir: str) -> list[dict[str, Any]]:
    return [row for row in (_row(spec, workdir) for spec in specs) if row is not None]


@contextlib.contextmanager
def _locked(workdir: str) -> Iterator[None]:
    """Serialise table writers (parallel workers, array tasks on one file system)."""
    with open(os.path.join(workdir, ".table.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_table(specs: Sequence[RunSpec], workdir: str) -> list[dict[str, Any]]:
    """Rebuild results.jsonl and results.csv from the run directories."""
    os.makedirs(workdir, exist_ok=True)
    with _locked(workdir):
        table = rows(specs, workdir)
        write_text_atomic(os.path.join(workdir, TABLE_JSONL), "".join(json.dumps(row) + "\n" for row in table))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        for row in table:
            writer.writerow({**row, "point": json.dumps(row["point"], sort_keys=True)})
        write_text_atomic(os.path.join(workdir, TABLE_CSV), buffer.getvalue())
    return table

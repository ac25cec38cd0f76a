"""A study file: its base config, its grid, and the run each grid point becomes.

A study is a Python file in `experiments/` with

  get_config(arg=None)  the base config (saejax.config.base_config() changed),
  get_hyper(hyper)      the grid: a list of {dotted key: value} points (saejax.sweep.hyper),
  get_harvest()         optional: {"config": harvest config, "overrides": {...}}, the store
                        the study trains on, harvested into WORKDIR/acts when data.path is empty.

Every point becomes a run in WORKDIR/runs/<name>, named by its swept values
and the hash of its full config: editing the study makes new runs, never
mixes results of two configs in one directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
from typing import Any, Sequence

from saejax.config import _check_schema, _migrate_config, active_tree, base_config, set_value, validate
from saejax.errors import ConfigError
from saejax.sweep import hyper

STORE_DIR = "acts"
RUNS_DIR = "runs"
# Keys that change how a run reports, saves or is checked, not what it computes: left out of
# its hash, so changing them (say, checkpointing more often) continues the same runs.
UNHASHED_KEYS = ("train.progress", "train.log_every", "data.prefetch", "checkpoint", "device_memory_gb")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    index: int
    name: str
    point: dict[str, Any]
    config: Any  # a locked ConfigDict
    config_hash: str
    run_dir: str


@dataclasses.dataclass
class Study:
    path: str
    module: Any

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def harvest_spec(self) -> dict[str, Any] | None:
        if not hasattr(self.module, "get_harvest"):
            return None
        spec = self.module.get_harvest()
        if not isinstance(spec, dict) or "config" not in spec:
            raise ConfigError(f"get_harvest() in {self.path} must return {{'config': NAME_OR_PATH, 'overrides': {{...}}}}")
        return spec


def load_study(path: str) -> Study:
    if not os.path.isfile(path):
        raise ConfigError(f"study file {path!r} not found; give a Python file with get_config() and get_hyper(hyper), "
                          "e.g. experiments/minilm_cpu.py")
    spec = importlib.util.spec_from_file_location(f"saejax_study_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"study file {path} failed to load: {type(e).__name__}: {e}") from e
    missing = [f for f in ("get_config", "get_hyper") if not hasattr(module, f)]
    if missing:
        raise ConfigError(f"study file {path} lacks {' and '.join(f + '()' for f in missing)}; "
                          "a study returns its base config and its grid (see experiments/README.md)")
    return Study(os.path.abspath(path), module)


def config_hash(config, workdir: str) -> str:
    """sha256 of the config that defines the run, with paths inside the sweep made relative.

    Only the groups the run uses count (`saejax.config.active_tree`), so adding a
    family, source or algorithm renames no existing run.
    """
    tree = active_tree(config)
    for dotted in UNHASHED_KEYS:
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    path = tree["data"]["path"]
    if path and os.path.abspath(path).startswith(os.path.abspath(workdir) + os.sep):
        tree["data"]["path"] = "<sweep>/" + os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    return re.sub(r"[^A-Za-z0-9.+]+", "_", str(value)).strip("_")


def run_name(point: dict[str, Any], digest: str) -> str:
    """e.g. {"sae.n": 1024, "sae.k": 8} -> "n1024-k8-3f2a9c1b"."""
    parts = [f"{key.split('.')[-1]}{_format_value(value)}" for key, value in point.items()]
    return "-".join(parts + [digest[:8]]) if parts else f"run-{digest[:8]}"


def grid(study: Study) -> list[dict[str, Any]]:
    try:
        points = study.module.get_hyper(hyper)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"get_hyper() in {study.path} failed: {type(e).__name__}: {e}") from e
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"get_hyper() in {study.path} must return a list of dicts (use hyper.product/sweep)")
    return points or [{}]


def base(study: Study, overrides: Sequence[tuple[str, str]]):
    try:
        config = study.module.get_config()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"get_config() in {study.path} failed: {type(e).__name__}: {e}") from e
    config = _migrate_config(config)
    _check_schema(config, base_config())
    for key, value in overrides:
        set_value(config, key, value)
    return config


def specs(study: Study, workdir: str, overrides: Sequence[tuple[str, str]] = (), num_devices: int | None = None) -> list[RunSpec]:
    """One RunSpec per grid point, each config validated before anything runs."""
    points = grid(study)
    base_config_ = base(study, overrides)
    swept = {key for point in points for key in point}
    clash = sorted(swept & {key for key, _ in overrides})
    if clash:
        raise ConfigError(f"--config.{clash[0]} is swept by {study.path}; "
                          "change the grid in the study file instead of overriding it")
    if not base_config_.data.path and study.harvest_spec() is not None:
        base_config_.data.path = os.path.join(os.path.abspath(workdir), STORE_DIR)
    result, names = [], {}
    for index, point in enumerate(points):
        config = base_config_.copy_and_resolve_references()
        for key, value in point.items():
            try:
                set_value(config, key, value)
            except ConfigError as e:
                raise ConfigError(f"grid point {index} of {study.path}: {e}") from None
        config.lock()
        if num_devices is not None:
            try:
                validate(config, num_devices)
            except ConfigError as e:
                raise ConfigError(f"grid point {index} ({point}) of {study.path}: {e}") from None
        digest = config_hash(config, workdir)
        name = run_name(point, digest)
        if name in names:
            raise ConfigError(f"grid points {names[name]} and {index} of {study.path} are the same run ({point}); "
                              "remove the duplicate")
        names[name] = index
        result.append(RunSpec(index, name, dict(point), config, digest,
                              os.path.join(os.path.abspath(workdir), RUNS_DIR, name)))
    return result

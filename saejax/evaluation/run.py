"""evaluate_run(RUN_DIR): run the enabled evaluators, write eval.json, update results.json.

A run directory is whatever `saejax train` (or `saejax import`) leaves:
the exported SAE (sae.safetensors + cfg.json) and results.json with the
run's config, which says where its activations are. Settings come from that
config's `eval` group, with `eval.*` overrides on top.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

from saejax.errors import ConfigError

EVAL_FILE = "eval.json"


def _imported_config(run_dir: str, store: str):
    """The config of an SAE with no results.json (`saejax import`): its cfg.json on `store`."""
    import json

    from saejax.config import base_config, set_value
    from saejax.export import CONFIG_FILE, set_inner_options

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir} holds no finished run (no results.json with its config) and no exported SAE "
                          "(no cfg.json); train it to the end first (`saejax train ... --workdir RUN_DIR`) or "
                          "import one (`saejax import`)")
    if not store:
        raise ConfigError(f"{run_dir} has an SAE but no results.json (an imported SAE): say which activations to "
                          "evaluate it on with --store STORE")
    with open(path) as f:
        cfg = json.load(f)
    config = base_config()
    set_value(config, "sae.family", cfg["family"])
    set_value(config, "sae.d", int(cfg["d"]))
    set_value(config, "sae.n", int(cfg["n"]))
    for key, value in (cfg.get("options") or {}).items():
        set_value(config, f"sae.{cfg['family']}.{key}", value)
    set_inner_options(config, cfg)
    set_value(config, "data.source", "store")
    set_value(config, "data.path", store)
    set_value(config, "data.batch_size", 256)  # only the store's size check reads it: evaluation batches itself
    return config


def run_config(run_dir: str, overrides: Sequence[tuple[str, str]] = (), store: str = ""):
    """The run's saved config (results.json) with `eval.*` overrides applied.

    An imported SAE (cfg.json, no results.json) is evaluated on `store`; a trained
    run can be evaluated on another store than its own the same way.
    """
    from saejax.config import base_config, config_from_dict, set_value
    from saejax.results import read_results

    results = read_results(run_dir)
    if results is None or "config" not in results:
        config = _imported_config(run_dir, store)
    else:
        config = config_from_dict(results["config"])
        config.unlock()
        if "eval" not in results["config"]:  # a run trained before evaluation settings existed
            config.eval = base_config().eval
        if store:
            config.data.source, config.data.path = "store", store
    for key, value in overrides:
        if not key.startswith("eval."):
            raise ConfigError(f"--config.{key}: `saejax eval` takes only eval.* settings (the run's other "
                              "settings are what it was trained with)")
        set_value(config, key, value)
    config.lock()
    return config


def evaluate_run(run_dir: str, config=None, overrides: Sequence[tuple[str, str]] = (),
                 log=None, store: str = "") -> dict[str, Any]:
    """Evaluate the SAE in `run_dir`; returns what eval.json holds."""
    from tqdm.auto import tqdm

    import saejax
    from saejax.config import _check_eval
    from saejax.evaluation import EVALUATORS
    from saejax.evaluation.inputs import EvalInputs
    from saejax.export import write_json_atomic
    from saejax.results import read_results, write_results

    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir} does not exist")
    config = config if config is not None else run_config(run_dir, overrides, store)
    _check_eval(config)
    progress = bool(config.eval.progress)
    inputs = EvalInputs(run_dir, config, progress)
    chosen = [name for name in EVALUATORS if config.eval[name].enabled]
    report: dict[str, Any] = {"run_dir": run_dir, "family": inputs.sae.family.name, "n": inputs.sae.n,
                              "d": inputs.sae.d, "evaluators": {}, "skipped": {}, "timings_s": {},
                              "saejax_version": saejax.__version__}
    headline: dict[str, Any] = {}
    bar = tqdm(chosen, desc="eval", unit="metric", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        evaluator = EVALUATORS[name]()
        started = time.time()
        reason = evaluator.skip_reason(inputs)
        if reason is not None:
            report["skipped"][name] = reason
            if log:
                log(f"eval: {name} skipped: {reason}")
            continue
        figures = evaluator.run(inputs, config.eval[name])
        report["evaluators"][name] = figures
        report["timings_s"][name] = round(time.time() - started, 3)
        headline.update(evaluator.headline(figures))
    bar.close()
    if "lm" in inputs.__dict__ or "_bare" in inputs.__dict__:
        report["model"] = {k: (inputs.lm or inputs._bare).facts.get(k)
                           for k in ("name", "class", "weights_sha256", "architectures")}
        report["hookpoint"] = inputs.ledger["hookpoint"]
        report["contexts"] = {"count": int(config.eval.contexts), "first_index": int(inputs.ledger.get("contexts") or 0)}
    report["headline"] = headline
    report["notes"] = inputs.notes
    write_json_atomic(os.path.join(run_dir, EVAL_FILE), report)
    results = read_results(run_dir)
    if results is not None:
        results.setdefault("eval_metrics", {}).update(headline)
        results["eval"] = {"file": os.path.join(run_dir, EVAL_FILE), "skipped": report["skipped"]}
        write_results(run_dir, results)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The headline figures and what was skipped, one per line, for the terminal."""
    lines = [f"{report['run_dir']}: {report['family']} n={report['n']}"]
    for key, value in report["headline"].items():
        lines.append(f"  {key:<22} {value:.5g}" if isinstance(value, float) else f"  {key:<22} {value}")
    for name, reason in report["skipped"].items():
        lines.append(f"  {name} skipped: {reason}")
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    lines.append(f"  details in {os.path.join(report['run_dir'], EVAL_FILE)}")
    return "\n".join(lines)

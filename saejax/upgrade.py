"""`saejax upgrade --from RUN_DIR --workdir OUT`: a trained SAE -> a Rational SAE (saejax.models.rational).

RUN_DIR is a finished saejax run (results.json holds its config, so its data and training settings
are reused) or an SAE imported by `saejax import` (cfg.json only: give --store). OUT becomes an
ordinary run of `sae.family=rational` with `sae.rational.init_from=RUN_DIR`:

* stage 1 (the family's init): the teacher's weights, the minimax fit of its gate, the l2
  calibration of a, b, C_in, C_out on its real pre-activations (the init sample's training rows);
  also exported alone to OUT/stage1/ (sae.safetensors + cfg.json) for comparison;
* stage 2: fine-tuning of everything by the trainer under the teacher's objective: checkpoints,
  resume, sae.safetensors, cfg.json (load_sae), results.json as for any run.

eval.json holds teacher, stage-1 and fine-tuned student on the same held-out rows (the trainer's
eval split, `train.eval_batches` batches) and, on a store, `evaluate_run`'s reports of teacher and
student on the same held-out contexts.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Sequence

import numpy as np

from saejax.errors import ConfigError
from saejax.export import CONFIG_FILE, LAYER_NORM, WEIGHTS_FILE

PREFIX = "sae.rational"


def _teacher_cfg(run_dir: str) -> dict[str, Any]:
    if not os.path.isdir(run_dir):
        raise ConfigError(f"--from {run_dir}: no such run directory")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not os.path.exists(os.path.join(run_dir, name))]
    if missing:
        raise ConfigError(f"--from {run_dir}: the run is incomplete (no {' or '.join(missing)}); finish it "
                          "(`saejax train` again with the same --workdir) or import an SAE there (`saejax import`)")
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        return json.load(f)


def student_config(run_dir: str, overrides: Sequence[tuple[str, str]] = (), store: str = ""):
    """The config of the upgrade run (unlocked checks done by the trainer's validate)."""
    from saejax.config import base_config, config_from_dict, set_value
    from saejax.models.rational import REFUSED, TEACHERS
    from saejax.results import read_results

    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    cfg = _teacher_cfg(run_dir)
    family = cfg.get("family")
    if family in REFUSED:
        raise ConfigError(f"--from {run_dir}: a {family} SAE cannot be upgraded: {REFUSED[family]}; "
                          f"the families that can: {', '.join(TEACHERS)}")
    if family not in TEACHERS:
        raise ConfigError(f"--from {run_dir}: a {family!r} SAE cannot be upgraded (no scalar gate); "
                          f"the families that can: {', '.join(TEACHERS)}")
    normalization = cfg.get("normalization") or {}
    if normalization.get("method") == LAYER_NORM:
        raise ConfigError(f"--from {run_dir}: the SAE layer-normalises each token (cfg.json normalization.method = "
                          "layer_norm); saejax trains on globally scaled activations, so it cannot be fine-tuned here")
    results = read_results(run_dir)
    if results is not None and "config" in results:
        config = config_from_dict(results["config"])
        config.unlock()
    else:
        if not store:
            raise ConfigError(f"--from {run_dir}: an imported SAE (no results.json) has no data of its own: "
                              "say which activations to fine-tune on with --store STORE")
        config = base_config()
        set_value(config, "sae.d", int(cfg["d"]))
        set_value(config, "sae.n", int(cfg["n"]))
    if store:
        set_value(config, "data.source", "store")
        set_value(config, "data.path", store)
    options = cfg.get("options") or {}
    set_value(config, "sae.family", "rational")  # resets the teacher's group: set it again below
    for key, value in options.items():
        set_value(config, f"sae.{family}.{key}", value)
    set_value(config, f"{PREFIX}.teacher", family)
    set_value(config, f"{PREFIX}.init_from", run_dir)
    for key, value in overrides:
        if key.startswith(f"{PREFIX}.teacher") or key.startswith(f"{PREFIX}.init_from"):
            raise ConfigError(f"--config.{key}: set by `saejax upgrade` from --from")
        set_value(config, key, value)
    return config, cfg


def _scale(config) -> float:
    """This run's normalisation scale, found as the trainer finds it."""
    from saejax.data import make_source
    from saejax.data.pipeline import estimate_scale

    if not config.data.normalize:
        return 1.0
    source = make_source(config)
    stored = source.stored_scale()
    if stored is not None:
        return float(stored)
    return estimate_scale(source.sample(int(config.sae.init_sample_rows)))


def _heldout(config, family, params, scale: float) -> dict[str, float]:
    import jax.numpy as jnp

    from saejax.data import make_source
    from saejax.data.pipeline import host_batch
    from saejax.inference import reconstruction_metrics
    from saejax.sharding import make_mesh

    source = make_source(config)
    mesh = make_mesh(1, 1)
    batch = int(config.data.batch_size)
    stream = (jnp.asarray(host_batch(source, i, batch, scale, "eval")) for i in range(int(config.train.eval_batches)))
    return reconstruction_metrics(family, params, stream, mesh, float(config.sae.dense_threshold))


def _stage_one(config, scale: float, workdir: str):
    """(student family, stage-1 inference params, teacher family, teacher inference params)."""
    import jax
    import jax.numpy as jnp

    from saejax.data import make_source
    from saejax.export import export_sae
    from saejax.models import get_family

    family = get_family(config)
    sample = make_source(config).sample(int(config.sae.init_sample_rows)) * np.float32(scale)
    sample = jnp.asarray(sample)
    params = family.init_params(jax.random.PRNGKey(int(config.seed)), sample)
    state = family.init_state(params, sample)
    inference = family.inference_params(params, state)
    tensors, cfg = family.export(inference)
    cfg["normalization"] = {"scale": scale, "method": "the upgrade run's"}
    cfg["stage"] = "1: teacher weights, fitted and calibrated rational gate, before fine-tuning"
    os.makedirs(os.path.join(workdir, "stage1"), exist_ok=True)
    export_sae(os.path.join(workdir, "stage1"), tensors, cfg)
    teacher_params, teacher_state = family._loaded_teacher()
    teacher_params = {k: jnp.asarray(v) for k, v in teacher_params.items()}
    # The teacher's codes are in its own units: 1/r goes into its decoder here (the student's C_out).
    teacher_params["W_dec"] = teacher_params["W_dec"] / np.float32(family.init_rescale)
    teacher_state = {**family.teacher.init_state(teacher_params, sample),
                     **{k: jnp.asarray(v) for k, v in teacher_state.items()}}
    teacher_inference = family.teacher.inference_params(teacher_params, teacher_state)
    scalars = {k: np.asarray(v).tolist() for k, v in inference.items() if k.startswith("rational_")}
    return family, inference, family.teacher, teacher_inference, scalars


def _evaluate_teacher(run_dir: str, workdir: str, config, log):
    """evaluate_run's report of the teacher (a copy of its export in OUT/teacher) with this run's settings."""
    from saejax.evaluation.run import _imported_config, evaluate_run

    copy_dir = os.path.join(workdir, "teacher")
    os.makedirs(copy_dir, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(os.path.join(run_dir, name), os.path.join(copy_dir, name))
    teacher_config = _imported_config(copy_dir, str(config.data.path))
    with teacher_config.unlocked():
        teacher_config.eval = config.eval.copy_and_resolve_references()
    teacher_config.lock()
    return evaluate_run(copy_dir, teacher_config, log=log)


def upgrade(run_dir: str, workdir: str, overrides: Sequence[tuple[str, str]] = (), store: str = "",
            log=print) -> dict[str, Any]:
    """Stage 1 and stage 2 into `workdir`; returns what eval.json holds."""
    from saejax.config import validate
    from saejax.evaluation.run import EVAL_FILE, evaluate_run
    from saejax.export import write_json_atomic
    from saejax.results import read_results
    from saejax.trainer import train_and_evaluate

    import jax

    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    config, cfg = student_config(run_dir, overrides, store)
    teacher_scale = float((cfg.get("normalization") or {}).get("scale", 1.0))
    evaluate_at_end = bool(config.eval.at_end) and config.data.source == "store"
    config.eval.at_end = False  # evaluated below, next to the teacher
    config.lock()
    validate(config, jax.device_count())
    scale = _scale(config)
    with config.unlocked():
        config.sae.rational.init_rescale = teacher_scale / scale
    validate(config, jax.device_count())

    family, stage1, teacher, teacher_params, scalars = _stage_one(config, scale, workdir)
    heldout = {"teacher": _heldout(config, teacher, teacher_params, scale),
               "stage1": _heldout(config, family, stage1, scale)}
    log(f"upgrade: stage 1 held-out nmse {heldout['stage1'].get('nmse', float('nan')):.5f} "
        f"(teacher {heldout['teacher'].get('nmse', float('nan')):.5f})")
    results = train_and_evaluate(config, workdir)
    from saejax.export import load_sae

    student = load_sae(workdir)
    heldout["student"] = _heldout(config, student.family, student.params, scale)
    report: dict[str, Any] = {
        "teacher_run": run_dir, "teacher_family": teacher.name, "degrees": [family.p, family.q],
        "gate_threshold": family.threshold, "init_rescale": float(config.sae.rational.init_rescale),
        "stage1_scalars": scalars, "heldout_rows": heldout,
        "heldout": f"train.eval_batches={config.train.eval_batches} batches of {config.data.batch_size} rows of "
                   "the eval split, normalised by this run's scale; the same rows for all three",
        "steps": results.get("steps"),
    }
    if evaluate_at_end:
        report["student"] = evaluate_run(workdir, config, log=log)
        report["teacher"] = _evaluate_teacher(run_dir, workdir, config, log)
    write_json_atomic(os.path.join(workdir, EVAL_FILE), report)
    results = read_results(workdir)
    if results is not None:
        results["upgrade"] = {"from": run_dir, "eval": os.path.join(workdir, EVAL_FILE)}
        from saejax.results import write_results

        write_results(workdir, results)
    return report

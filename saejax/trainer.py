"""train_and_evaluate(config, workdir): the whole run, top to bottom.

validate config -> mesh -> data -> (restore | init) -> compile + print plan ->
loop (step, metrics, checkpoints, preemption) -> evaluate -> export -> results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import saejax
from saejax.algorithms import PARAMS, STEP, get_algorithm
from saejax.checkpoint import Checkpointer
from saejax.config import validate
from saejax.data import check_finite, make_source
from saejax.data.pipeline import BatchFeeder, device_batch, estimate_scale, host_batch
from saejax.data.synthetic import SyntheticSource
from saejax.errors import ConfigError, DataError, TrainingDivergedError
from saejax.export import export_sae
from saejax.models import get_family
from saejax.plan import batch_sharding, check_budget, compile_train_step, format_plan, make_plan
from saejax.preemption import Preempted, PreemptionGuard
from saejax.results import METRICS_FILE, MetricsWriter, read_metrics, read_results, write_results
from saejax.sharding import make_mesh

# Config keys that define a run: resuming with any of them changed is refused.
IDENTITY_KEYS = ("seed", "sae", "optim", "train.algorithm", "data.source", "data.path",
                 "data.batch_size", "data.normalize", "data.eval_fraction", "data.synthetic")
DIVERGENCE_METRICS = ("loss", "nmse", "grad_norm")


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def check_resumable(saved_config: dict, config) -> None:
    current = config.to_dict()
    changed = [k for k in IDENTITY_KEYS if json.dumps(_get(saved_config, k), sort_keys=True) != json.dumps(_get(current, k), sort_keys=True)]
    if changed:
        details = "; ".join(f"{k}: checkpoint {_get(saved_config, k)!r} vs now {_get(current, k)!r}" for k in changed)
        raise ConfigError(
            f"the workdir holds checkpoints of a different run ({details}). "
            "Use a fresh --workdir, or restore the original values to resume."
        )


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class _Run:
    """State of one invocation of the training loop."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.batch_size = int(config.data.batch_size)
        self.started = time.time()

    # ----------------------------------------------------------------- setup

    def setup(self) -> None:
        config = self.config
        mesh_data, mesh_model = validate(config, jax.device_count())
        self.mesh = make_mesh(mesh_data, mesh_model)
        self.source = make_source(config)
        if self.source.d != config.sae.d:
            raise DataError(f"{self.source.describe()} has d={self.source.d} but sae.d={config.sae.d}")
        self.family = get_family(config)
        self.algorithm = get_algorithm(self.family, config, self.mesh)
        os.makedirs(self.workdir, exist_ok=True)
        self.checkpointer = Checkpointer.from_config(self.workdir, config)
        self.latest = self.checkpointer.latest_step()
        self.meta = self.checkpointer.restore_meta(self.latest) if self.latest is not None else None
        if self.meta:
            check_resumable(self.meta["config"], config)

        sample = self.source.sample(int(config.sae.init_sample_rows))
        check_finite(sample, 0, "train", self.source, what="the initialisation sample (sae.init_sample_rows rows)")
        if self.meta:
            self.normalization = self.meta["normalization"]
        elif not config.data.normalize:
            self.normalization = {"scale": 1.0, "method": "none (data.normalize=false)"}
        elif self.source.stored_scale() is not None:
            self.normalization = {"scale": self.source.stored_scale(), "method": "whole dataset, stored with the data"}
        else:
            self.normalization = {"scale": estimate_scale(sample),
                                  "method": f"estimated on {sample.shape[0]} sampled rows"}
        self.scale = float(self.normalization["scale"])
        self.sample = sample * np.float32(self.scale)

        self.abstract_state = self.algorithm.abstract_state(self.sample.shape[0])
        self.step_fn = compile_train_step(self.algorithm, self.abstract_state, self.batch_size, self.mesh)
        self.plan = make_plan(self.step_fn, self.abstract_state, self.family, config, self.mesh)
        log(format_plan(self.plan, config))
        check_budget(self.plan, config)

    def init_or_restore(self):
        if self.latest is not None:
            state, _ = self.checkpointer.restore(self.latest, self.abstract_state)
            if int(state[STEP]) != self.latest:
                raise ConfigError(f"checkpoint {self.latest} holds step {int(state[STEP])}; the checkpoint directory is inconsistent")
            log(f"resumed from {self.checkpointer.directory}/{self.latest}")
            return state, self.latest
        shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
        init = jax.jit(self.algorithm.init_state, out_shardings=shardings)
        return init(jax.random.PRNGKey(self.config.seed), jnp.asarray(self.sample)), 0

    # ----------------------------------------------------------------- loop

    def _meta(self, step: int) -> dict[str, Any]:
        previous = self.meta["wall_time_s"] if self.meta else 0.0
        return {
            "step": step,
            "tokens_seen": step * self.batch_size,
            "config": self.config.to_dict(),
            "normalization": self.normalization,
            "data": self.source.metadata(),
            "wall_time_s": previous + time.time() - self.started,
            "saejax_version": saejax.__version__,
        }

    def save(self, state, step: int) -> None:
        if not bool(_all_finite(state[PARAMS])):
            raise TrainingDivergedError(
                f"parameters are NaN/inf at step {step}; not saving. {self._last_good()} "
                "Lower optim.lr or check the data."
            )
        self.checkpointer.save(step, state, self._meta(step))
        self.last_saved = step

    def _last_good(self) -> str:
        if self.last_saved is None:
            return "No checkpoint was written yet."
        return f"The last good checkpoint, step {self.last_saved} in {self.checkpointer.directory}, is intact."

    def consume(self, step: int, metrics) -> dict[str, float]:
        """Fetch a step's metrics to the host, stop on NaN/inf, log them."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = [k for k in DIVERGENCE_METRICS if k in values and not np.isfinite(values[k])]
        if bad:
            raise TrainingDivergedError(
                f"training diverged at step {step}: {', '.join(f'{k}={values[k]}' for k in bad)}. "
                f"{self._last_good()} Lower optim.lr (now {values.get('lr', float('nan')):.3g}) or check the data, "
                "then resume from that checkpoint."
            )
        now = time.time()
        self.tokens_per_sec = (step - self.window_step) * self.batch_size / max(now - self.window_time, 1e-9)
        if step % self.config.train.log_every == 0 or step == self.config.train.steps:
            self.writer.write({"step": step, "tokens": step * self.batch_size, **values,
                               "tokens_per_sec": self.tokens_per_sec, "elapsed_s": now - self.started})
            self.window_step, self.window_time = step, now
        self.progress.update(step - self.progress.n)
        self.progress.set_postfix(
            {"tok/s": f"{self.tokens_per_sec:,.0f}", "nmse": f"{values['nmse']:.4f}",
             "L0": f"{values['l0']:.1f}", "dead": f"{values['dead_fraction']:.3f}"}, refresh=False)
        self.last_metrics = {"step": step, **values}
        return values

    def loop(self, state, start: int):
        config, steps = self.config, int(self.config.train.steps)
        every = int(config.checkpoint.every_steps)
        self.last_saved = self.latest
        self.writer = MetricsWriter(self.workdir, start)
        self.window_step, self.window_time, self.tokens_per_sec = start, time.time(), 0.0
        self.last_metrics = None
        self.progress = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                             disable=not (config.train.progress and jax.process_index() == 0),
                             mininterval=0.5 if sys.stderr.isatty() else 30.0)
        feeder = BatchFeeder(self.source, self.batch_size, batch_sharding(self.mesh), self.scale,
                             start, steps, int(config.data.prefetch))
        pending = None
        try:
            with PreemptionGuard() as guard:
                for step in range(start, steps):
                    state, metrics = self.step_fn(state, feeder.get(step))
                    if pending is not None:  # fetch the previous step's metrics while this one runs
                        self.consume(*pending)
                    pending = (step + 1, metrics)
                    preempted = guard.requested()
                    if preempted or step + 1 == steps or (every and (step + 1) % every == 0):
                        self.consume(*pending)
                        pending = None
                        self.save(state, step + 1)
                    if preempted:
                        self.checkpointer.wait()
                        self.progress.close()
                        log(f"{guard.signal_name}: saved step {step + 1} to {self.checkpointer.directory}; "
                            f"exiting with code {Preempted.exit_code} so the job can be requeued")
                        raise Preempted(f"preempted by {guard.signal_name} at step {step + 1}; state saved")
                if pending is not None:
                    self.consume(*pending)
        finally:
            feeder.close()
            self.progress.close()
            self.writer.close()
        self.checkpointer.wait()
        return state

    # ----------------------------------------------------------------- wrap-up

    def evaluate(self, params) -> dict[str, float]:
        batches = int(self.config.train.eval_batches)
        if not batches:
            return {}
        no_dead = jnp.zeros((self.family.n,), bool)
        eval_fn = jax.jit(lambda p, b: self.family.loss(p, b, no_dead, self.mesh)[1].metrics)
        totals: dict[str, float] = {}
        for i in range(batches):
            batch = device_batch(host_batch(self.source, i, self.batch_size, self.scale, "eval"),
                                 self.batch_size, batch_sharding(self.mesh))
            for k, v in jax.device_get(eval_fn(params, batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v) / batches
        totals.pop("auxk_loss", None)
        totals["explained_variance"] = 1.0 - totals["nmse"]
        return totals

    def finish(self, state) -> dict[str, Any]:
        params = self.algorithm.export_params(state)
        eval_metrics = self.evaluate(params)
        tensors, cfg = self.family.export(params)
        steps = int(state[STEP])
        cfg.update({
            "normalization": {**self.normalization,
                              "usage": "encode x * scale; divide reconstructions by scale for raw activations"},
            "weights": "ema" if self.config.optim.ema_decay else "final",
            "trained_steps": steps,
            "trained_tokens": steps * self.batch_size,
            "data": self.source.metadata(),
            "saejax_version": saejax.__version__,
        })
        weights_path, cfg_path = export_sae(self.workdir, tensors, cfg)
        meta = self._meta(steps)
        final_train = self.last_metrics
        metrics_path = os.path.join(self.workdir, METRICS_FILE)
        if final_train is None and os.path.exists(metrics_path):  # this invocation trained no step
            final_train = (read_metrics(metrics_path) or [{}])[-1]
        results = {
            "config": self.config.to_dict(),
            "steps": steps,
            "tokens_seen": steps * self.batch_size,
            "wall_time_s": meta["wall_time_s"],
            "flops_per_step": self.plan.flops_per_step,
            "total_flops": self.plan.flops_per_step * steps,
            "final_train_metrics": final_train or {},
            "eval_metrics": eval_metrics,
            "normalization": self.normalization,
            "data": self.source.metadata(),
            "plan": self.plan.as_dict(),
            "files": {"sae": weights_path, "cfg": cfg_path, "checkpoints": self.checkpointer.directory,
                      "metrics": metrics_path},
        }
        if isinstance(self.source, SyntheticSource):
            dictionary = np.asarray(jax.device_get(self.family.dictionary(params)))
            results["feature_recovery_mmcs"] = self.source.feature_recovery(dictionary)
        write_results(self.workdir, results)
        return results


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Train (or resume, or finish) the run in `workdir`; returns the contents of results.json."""
    run = _Run(config, workdir)
    run.setup()
    try:
        existing = read_results(workdir)
        if existing and run.latest is not None and existing.get("steps") == run.latest == config.train.steps:
            log(f"{workdir} already holds a finished run of {run.latest} steps; nothing to do")
            return existing
        state, start = run.init_or_restore()
        state = run.loop(state, start)
        return run.finish(state)
    finally:
        run.checkpointer.close()

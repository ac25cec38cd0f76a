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
from saejax.config import active_tree, family_key, validate
from saejax.data import check_finite, make_source
from saejax.data.pipeline import BatchFeeder, device_batch, estimate_scale, host_batch
from saejax.data.synthetic import SyntheticSource
from saejax.errors import ConfigError, DataError, SaeJaxError, TrainingDivergedError, WorkdirIOError
from saejax.export import export_sae, to_host
from saejax.inference import reconstruction_metrics
from saejax.models import get_family
from saejax.peers import PeerWatchdog
from saejax.plan import batch_sharding, check_budget, compile_train_step, format_plan, make_plan
from saejax.preemption import Preempted, PreemptionGuard
from saejax.results import METRICS_FILE, MetricsWriter, read_metrics, read_results, write_results
from saejax.sharding import make_mesh
from saejax.workdir import hold_workdir

# Config keys that define a run: resuming with any of them changed is refused.
IDENTITY_KEYS = ("seed", "sae", "optim", "train.algorithm", "data.source", "data.path",
                 "data.batch_size", "data.normalize", "data.eval_fraction", "data.synthetic")
DIVERGENCE_METRICS = ("loss", "nmse", "grad_norm")
# Config keys that runs trained in one pass (train_group) must share: they read one batch stream on one mesh.
GROUP_SHARED_KEYS = ("seed", "data", "mesh")


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _leaves(tree, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}.{key}").items()}


def check_resumable(saved_config: dict, config) -> None:
    """Refuse to resume a checkpoint written with other identity keys; name the keys that differ."""
    saved, current = active_tree(saved_config), active_tree(config)
    before, now = {}, {}
    # The chosen algorithm's own group (train.<algorithm>.*) is identity too.
    for key in IDENTITY_KEYS + (f"train.{config.train.algorithm}",):
        before.update(_leaves(_get(saved, key), key))
        now.update(_leaves(_get(current, key), key))
    changed = [k for k in sorted(set(before) | set(now))
               if json.dumps(before.get(k), sort_keys=True) != json.dumps(now.get(k), sort_keys=True)]
    if changed:
        details = "; ".join(f"{family_key(config, k)}: checkpoint {before.get(k)!r} vs now {now.get(k)!r}"
                            for k in changed)
        raise ConfigError(
            f"the workdir holds checkpoints of a different run ({details}). "
            "Use a fresh --workdir, or restore the original values to resume."
        )


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class _Run:
    """One SAE being trained: its config, workdir, state, checkpoints and metrics.

    The batch stream is not part of it: `train_group` feeds the same batches to
    every run of a group (one run for `saejax train`).
    """

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.name = os.path.basename(os.path.normpath(workdir))
        self.batch_size = int(config.data.batch_size)
        self.steps = int(config.train.steps)
        self.started = time.time()
        self.checkpointer = None

    # ----------------------------------------------------------------- setup

    def setup(self, mesh, source) -> None:
        config = self.config
        self.mesh, self.source = mesh, source
        if source.d != config.sae.d:
            raise DataError(f"{source.describe()} has d={source.d} but sae.d={config.sae.d}")
        self.family = get_family(config)
        self.algorithm = get_algorithm(self.family, config, mesh)
        os.makedirs(self.workdir, exist_ok=True)
        self.checkpointer = Checkpointer.from_config(self.workdir, config)
        self.latest = self.checkpointer.latest_step()
        self.meta = self.checkpointer.restore_meta(self.latest) if self.latest is not None else None
        if self.meta:
            check_resumable(self.meta["config"], config)

        sample = source.sample(int(config.sae.init_sample_rows))
        check_finite(sample, 0, "train", source, what="the initialisation sample (sae.init_sample_rows rows)")
        if self.meta:
            self.normalization = self.meta["normalization"]
        elif not config.data.normalize:
            self.normalization = {"scale": 1.0, "method": "none (data.normalize=false)"}
        elif source.stored_scale() is not None:
            self.normalization = {"scale": source.stored_scale(), "method": "whole dataset, stored with the data"}
        else:
            self.normalization = {"scale": estimate_scale(sample),
                                  "method": f"estimated on {sample.shape[0]} sampled rows"}
        self.scale = float(self.normalization["scale"])
        self.sample = sample * np.float32(self.scale)

        self.abstract_state = self.algorithm.abstract_state(self.sample.shape[0])
        self.step_fn = compile_train_step(self.algorithm, self.abstract_state, self.batch_size, mesh)
        self.plan = make_plan(self.step_fn, self.abstract_state, self.family, config, mesh)
        log(format_plan(self.plan, config))
        check_budget(self.plan, config)

    def finished_results(self) -> dict[str, Any] | None:
        """results.json of this workdir if it already holds this run, finished."""
        existing = read_results(self.workdir)
        if existing and self.latest is not None and existing.get("steps") == self.latest == self.steps:
            log(f"{self.workdir} already holds a finished run of {self.latest} steps; nothing to do")
            return existing
        return None

    def init_or_restore(self) -> None:
        if self.latest is not None:
            state, _ = self.checkpointer.restore(self.latest, self.abstract_state)
            if int(state[STEP]) != self.latest:
                raise ConfigError(f"checkpoint {self.latest} holds step {int(state[STEP])}; the checkpoint directory is inconsistent")
            if self.latest > self.steps:
                raise ConfigError(f"{self.checkpointer.directory} holds step {self.latest}, past train.steps={self.steps}; "
                                  "raise train.steps or use a fresh --workdir")
            log(f"resumed from {self.checkpointer.directory}/{self.latest}")
            self.state, self.start = state, self.latest
            return
        shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
        init = jax.jit(self.algorithm.init_state, out_shardings=shardings)
        self.state, self.start = init(jax.random.PRNGKey(self.config.seed), jnp.asarray(self.sample)), 0

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

    def save(self, step: int) -> None:
        if not bool(_all_finite(self.state[PARAMS])):
            raise TrainingDivergedError(
                f"parameters are NaN/inf at step {step}; not saving. {self._last_good()} "
                "Lower optim.lr or check the data."
            )
        self.checkpointer.save(step, self.state, self._meta(step))
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
        self.algorithm.check_metrics(step, values)  # e.g. a closed-form solve that did not converge
        now = time.time()
        self.tokens_per_sec = (step - self.window_step) * self.batch_size / max(now - self.window_time, 1e-9)
        if step % self.config.train.log_every == 0 or step == self.steps:
            self.writer.write({"step": step, "tokens": step * self.batch_size, **values,
                               "tokens_per_sec": self.tokens_per_sec, "elapsed_s": now - self.started})
            self.window_step, self.window_time = step, now
        self.last_metrics = {"step": step, **values}
        return values

    def begin(self) -> None:
        self.last_saved = self.latest
        self.writer = MetricsWriter(self.workdir, self.start)
        self.window_step, self.window_time, self.tokens_per_sec = self.start, time.time(), 0.0
        self.last_metrics = None
        self.pending = None

    def advance(self, step: int, batch, preempted: bool) -> None:
        """Train step `step` on `batch`; save on the last step, every checkpoint.every_steps, or when preempted."""
        every = int(self.config.checkpoint.every_steps)
        self.checkpointer.check()  # a failed async save stops the run here, not at the next save
        self.state, metrics = self.step_fn(self.state, batch)
        if self.pending is not None:  # fetch the previous step's metrics while this one runs
            self.consume(*self.pending)
        self.pending = (step + 1, metrics)
        if preempted or step + 1 == self.steps or (every and (step + 1) % every == 0):
            self.flush()
            self.save(step + 1)

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.consume(*pending)

    def end(self) -> None:
        self.writer.close()
        self.checkpointer.wait()

    # ----------------------------------------------------------------- wrap-up

    def evaluate(self, params) -> dict[str, float]:
        """Held-out metrics through the family's inference encode/decode (as it will be used)."""
        batches = int(self.config.train.eval_batches)
        sharding = batch_sharding(self.mesh)
        stream = (device_batch(host_batch(self.source, i, self.batch_size, self.scale, "eval", sharding),
                               self.batch_size, sharding) for i in range(batches))
        return reconstruction_metrics(self.family, params, stream, self.mesh,
                                      float(self.config.sae.dense_threshold))

    def finish(self) -> dict[str, Any]:
        state = self.state
        params = self.algorithm.inference_params(state)
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
            "family": self.family.name,
            "sparsity_control": self.family.sparsity_control(),
            "l0": eval_metrics.get("l0", (final_train or {}).get("l0")),
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
            dictionary = to_host(self.family.dictionary(params))  # gathered: shards may be on other hosts
            results["feature_recovery_mmcs"] = self.source.feature_recovery(dictionary)
        write_results(self.workdir, results)
        return self.evaluate_at_end(results)

    def evaluate_at_end(self, results: dict[str, Any]) -> dict[str, Any]:
        """`saejax eval` on the finished run (single-process jobs; a failure here keeps the trained run)."""
        if not self.config.eval.at_end:
            return results
        if jax.process_count() > 1:
            log(f"{self.workdir}: evaluate with `saejax eval {self.workdir}` (not run at the end of "
                "multi-process jobs: it runs on one host)")
            return results
        from saejax.evaluation.run import evaluate_run

        try:
            evaluate_run(self.workdir, self.config, log=log)
        except SaeJaxError as e:
            log(f"{self.workdir}: evaluation failed, the trained SAE is kept: {e}. "
                f"Fix and run `saejax eval {self.workdir}`")
            return results
        return read_results(self.workdir) or results


def _shared_setup(configs) -> tuple[Any, Any]:
    """The mesh and data source every run of a group uses; refuses runs that cannot share them."""
    first = configs[0].to_dict()
    for config in configs[1:]:
        other = config.to_dict()
        differing = [key for key in GROUP_SHARED_KEYS if json.dumps(_get(first, key), sort_keys=True) != json.dumps(_get(other, key), sort_keys=True)]
        if differing:
            raise ConfigError(f"runs trained in one pass must share {', '.join(differing)} "
                              f"(they read the same batches on the same mesh); train them separately")
    shapes = {validate(config, jax.device_count()) for config in configs}
    if len(shapes) > 1:
        raise ConfigError(f"runs trained in one pass need one mesh shape, got {sorted(shapes)}")
    mesh = make_mesh(*shapes.pop())
    return mesh, make_source(configs[0])


class _GroupProgress:
    """One progress bar for a group; the postfix shows the run's metrics (or a summary of several)."""

    SHOWN = (("nmse", "nmse", ".4f"), ("l0", "L0", ".1f"), ("dead_fraction", "dead", ".3f"),
             ("dense_fraction", "dense", ".3f"))

    def __init__(self, config, total: int, initial: int, runs: int):
        self.runs = runs
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=not (config.train.progress and jax.process_index() == 0),
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def update(self, step: int, active: list[_Run]) -> None:
        self.bar.update(step - self.bar.n)
        with_metrics = [r for r in active if r.last_metrics]
        if self.runs == 1 and with_metrics:
            run = with_metrics[0]
            postfix = {"tok/s": f"{run.tokens_per_sec:,.0f}"}
            for key, label, form in self.SHOWN:  # a metric the family does not report is left out
                if key in run.last_metrics:
                    postfix[label] = format(run.last_metrics[key], form)
            self.bar.set_postfix(postfix, refresh=False)
        elif with_metrics:
            nmse = [r.last_metrics["nmse"] for r in with_metrics if "nmse" in r.last_metrics]
            postfix = {"runs": f"{len(active)}/{self.runs}"}
            if nmse:
                postfix["nmse"] = f"{min(nmse):.4f}..{max(nmse):.4f}"
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


def train_group(configs, workdirs, raise_errors: bool = True) -> list[dict[str, Any] | BaseException]:
    """Train several SAEs on one stream of batches: data read once, each with its own state and workdir.

    Every run resumes from its own checkpoints; batch s is the same for all
    (a function of s), so runs that resume at different steps stay in step.
    With `raise_errors=False` a run that fails (bad config, divergence) is
    dropped and its exception returned in its place; the others go on. An
    error of the shared data stream or a preemption ends every run.
    """
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("train_group needs one workdir per config")
    outcomes: list[dict[str, Any] | BaseException | None] = [None] * len(configs)
    mesh, source = _shared_setup(configs)
    runs = [_Run(config, workdir) for config, workdir in zip(configs, workdirs, strict=True)]

    def fail(i: int, error: BaseException) -> None:
        if raise_errors:
            raise error
        log(f"{runs[i].name}: failed: {error}")
        outcomes[i] = error

    try:
        for i, run in enumerate(runs):
            try:
                run.setup(mesh, source)
                outcomes[i] = run.finished_results()
                if outcomes[i] is None:
                    run.init_or_restore()
                    if run.start == run.steps:  # trained, but killed before its final evaluation and export
                        run.last_metrics = None
                        outcomes[i] = run.finish()
            except SaeJaxError as e:
                fail(i, e)
        active = [i for i in range(len(runs)) if outcomes[i] is None]
        if not active:
            return outcomes
        scales = {runs[i].scale for i in active}
        if len(scales) > 1:
            raise ConfigError(f"runs trained in one pass need one normalisation scale, got {sorted(scales)}")
        start = min(runs[i].start for i in active)
        stop = max(runs[i].steps for i in active)
        for i in active:
            runs[i].begin()
        progress = _GroupProgress(configs[0], stop, start, len(active))
        feeder = BatchFeeder(source, runs[active[0]].batch_size, batch_sharding(mesh), scales.pop(),
                             start, stop, int(configs[0].data.prefetch))
        try:
            with PreemptionGuard() as guard:
                for step in range(start, stop):
                    try:
                        batch, failure = feeder.get(step), None
                    except DataError as e:  # this process's rows; agreed with the others just below
                        batch, failure = None, e
                    preempted = guard.requested(failure)
                    for i in list(active):
                        run = runs[i]
                        if step < run.start:
                            continue
                        try:
                            run.advance(step, batch, preempted)
                            if step + 1 == run.steps:
                                run.end()
                                outcomes[i] = run.finish()
                                active.remove(i)
                        except (TrainingDivergedError, DataError, WorkdirIOError) as e:
                            active.remove(i)
                            fail(i, e)
                    progress.update(step + 1, [runs[i] for i in active])
                    if preempted:
                        for i in active:
                            runs[i].checkpointer.wait()
                        progress.close()
                        saved = ", ".join(runs[i].checkpointer.directory for i in active)
                        log(f"{guard.signal_name}: saved step {step + 1} to {saved}; exiting with code {Preempted.exit_code} "
                            "so the job can be requeued")
                        preempted_error = Preempted(f"preempted by {guard.signal_name} at step {step + 1}; state saved")
                        preempted_error.outcomes = outcomes  # runs that finished or failed before the signal
                        raise preempted_error
                    if not active:
                        break
        finally:
            feeder.close()
            progress.close()
            for run in runs:
                if hasattr(run, "writer"):
                    run.writer.close()
        return outcomes
    finally:
        for run in runs:
            if run.checkpointer is not None:
                run.checkpointer.close()


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Train (or resume, or finish) the run in `workdir`; returns the contents of results.json.

    The workdir is checked and locked first (one run per workdir); in a
    multi-process job a dead or failed peer ends every process (saejax.peers).
    """
    validate(config, jax.device_count())  # a bad config is refused before the workdir is created
    with PeerWatchdog(), hold_workdir(workdir):
        return train_group([config], [workdir])[0]

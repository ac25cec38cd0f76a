"""Run a study's grid: every point in its own run directory, N jobs at a time.

Each job is a worker subprocess (saejax.sweep.worker) training one run, or
with `one_pass` several runs that share the data stream. Subprocesses keep a
crash, an out-of-memory kill or a divergence in one run from touching the
others, and give the memory back between runs. The runner itself never
touches an accelerator. Finished runs are skipped, interrupted ones resume
from their checkpoints, failed ones are tried again; the table is rebuilt
from the run directories after every job.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from saejax.config import validate
from saejax.errors import EXIT_REQUEUE, ConfigError
from saejax.export import write_json_atomic
from saejax.results import METRICS_FILE
from saejax.store.layout import LEDGER_FILE
from saejax.sweep.study import RunSpec, Study
from saejax.sweep.table import (
    RUN_CONFIG_FILE,
    TABLE_CSV,
    TABLE_JSONL,
    clear_failure,
    failure,
    finished,
    record_failure,
    write_table,
)
from saejax.trainer import GROUP_SHARED_KEYS

LOGS_DIR = "logs"
EXIT_SOME_FAILED = 1


def check_configs(specs: Sequence[RunSpec]) -> None:
    """Validate every run's values before any job starts (the mesh is checked by the worker, on its devices)."""
    for spec in specs:
        mesh = spec.config.mesh
        devices = max(mesh.data, 1) * max(mesh.model, 1)
        try:
            validate(spec.config, devices)
        except ConfigError as e:
            raise ConfigError(f"run {spec.name} (grid point {spec.index}): {e}") from None


def write_run_config(spec: RunSpec) -> None:
    os.makedirs(spec.run_dir, exist_ok=True)
    path = os.path.join(spec.run_dir, RUN_CONFIG_FILE)
    wanted = spec.config.to_dict()
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) == wanted:
                return
    write_json_atomic(path, wanted)


def ensure_store(study: Study, specs: Sequence[RunSpec], log: Callable[[str], None]) -> None:
    """Harvest the study's own store (WORKDIR/acts) unless it is complete; a no-op for studies without one."""
    spec = study.harvest_spec()
    if spec is None or not specs:
        return
    store = specs[0].config.data.path
    if os.path.exists(os.path.join(store, LEDGER_FILE)):
        return
    from saejax.config import load_config
    from saejax.harvest import harvest
    from saejax.harvest.config import BUILTIN_DIR, harvest_config

    overrides = [(key, str(value)) for key, value in spec.get("overrides", {}).items()]
    config = load_config(spec["config"], overrides, schema=harvest_config, builtin_dir=BUILTIN_DIR)
    os.makedirs(os.path.dirname(store), exist_ok=True)
    with open(store + ".lock", "a") as lock:  # array tasks of one sweep: one harvests, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(store, LEDGER_FILE)):
            log(f"harvesting the study's activations into {store} (once; a rerun continues an interrupted harvest)")
            harvest(config, store)


def group_key(spec: RunSpec) -> str:
    tree = spec.config.to_dict()
    return json.dumps({key: tree[key] for key in GROUP_SHARED_KEYS}, sort_keys=True)


def plan_jobs(specs: Sequence[RunSpec], one_pass: bool, group_size: int) -> list[list[RunSpec]]:
    """Jobs in grid order; with one_pass, runs that read the same batches share a job (at most group_size)."""
    if not one_pass:
        return [[spec] for spec in specs]
    groups: dict[str, list[list[RunSpec]]] = {}
    order: list[list[RunSpec]] = []
    for spec in specs:
        chunks = groups.setdefault(group_key(spec), [])
        if not chunks or (group_size and len(chunks[-1]) >= group_size):
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(spec)
    return order


@dataclasses.dataclass
class _Job:
    specs: list[RunSpec]
    process: subprocess.Popen
    log_path: str
    slot: int
    started: float


def _last_step(run_dir: str) -> int:
    """The last step logged in a run's metrics.jsonl (0 if none yet); reads only the file's tail."""
    try:
        with open(os.path.join(run_dir, METRICS_FILE), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _summary(results: dict[str, Any]) -> str:
    train = results.get("final_train_metrics") or {}
    held_out = results.get("eval_metrics") or train
    nan = float("nan")
    return (f"nmse {held_out.get('nmse', nan):.4f}, L0 {held_out.get('l0', nan):.1f}, "
            f"dead {train.get('dead_fraction', nan):.3f}")


class Runner:
    def __init__(self, specs: Sequence[RunSpec], workdir: str, parallel: int = 1, one_pass: bool = False,
                 group_size: int = 0, gpus_per_run: int = 0, log: Callable[[str], None] = print):
        if parallel < 1:
            raise ConfigError(f"--parallel={parallel} must be >= 1")
        self.specs, self.workdir, self.parallel = list(specs), os.path.abspath(workdir), parallel
        self.one_pass, self.group_size, self.log = one_pass, group_size, log
        self.gpu_slots = self._gpu_slots(gpus_per_run)
        self.stop_signal: str | None = None

    def _gpu_slots(self, gpus_per_run: int) -> list[str] | None:
        if not gpus_per_run:
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [i for i in visible.split(",") if i] if visible else [str(i) for i in range(gpus_per_run * self.parallel)]
        if len(ids) < gpus_per_run * self.parallel:
            raise ConfigError(f"--parallel={self.parallel} x --gpus-per-run={gpus_per_run} needs "
                              f"{gpus_per_run * self.parallel} GPUs; CUDA_VISIBLE_DEVICES lists {len(ids)}")
        return [",".join(ids[s * gpus_per_run:(s + 1) * gpus_per_run]) for s in range(self.parallel)]

    def _start(self, specs: list[RunSpec], slot: int) -> _Job:
        os.makedirs(os.path.join(self.workdir, LOGS_DIR), exist_ok=True)
        name = specs[0].name + (f"+{len(specs) - 1}" if len(specs) > 1 else "")
        log_path = os.path.join(self.workdir, LOGS_DIR, f"{name}.log")
        for spec in specs:  # tried again: an old failure must not stand for this attempt's outcome
            clear_failure(spec.run_dir)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.gpu_slots is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_slots[slot]
        with open(log_path, "a") as log_file:
            log_file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} training {', '.join(s.name for s in specs)}\n")
            log_file.flush()
            process = subprocess.Popen([sys.executable, "-m", "saejax.sweep.worker", *(s.run_dir for s in specs)],
                                       stdout=log_file, stderr=subprocess.STDOUT, env=env)
        return _Job(specs, process, log_path, slot, time.time())

    def _finish(self, job: _Job, code: int) -> None:
        elapsed = time.time() - job.started
        log_name = os.path.relpath(job.log_path, self.workdir)
        for spec in job.specs:
            self.done_count += 1
            results = finished(spec)
            prefix = f"[{self.done_count:>{len(str(self.total))}}/{self.total}] {spec.name}:"
            if results is not None:
                self.log(f"{prefix} done in {elapsed:.0f}s: {_summary(results)}")
                continue
            if code == EXIT_REQUEUE or self.stop_signal:
                self.log(f"{prefix} stopped; its checkpoint is kept and the next run of the sweep resumes it")
                continue
            failed = failure(spec)
            if failed is None:  # the worker could not say why: killed, out of memory, crashed
                with open(job.log_path) as f:
                    tail = f.read()[-2000:]
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                record_failure(spec.run_dir, f"worker {how}; the end of its log:\n{tail}", "WorkerDied", code)
                failed = failure(spec)
            first_line = failed["error"].strip().splitlines()[0] if failed["error"].strip() else failed["type"]
            self.log(f"{prefix} FAILED ({failed['type']}): {first_line[:300]} (log: {log_name})")

    def _update_bar(self) -> None:
        """Steps trained so far by the running jobs, from their metrics.jsonl (at most once a second)."""
        now = time.time()
        if now - getattr(self, "_bar_checked", 0.0) < 1.0:
            return
        self._bar_checked = now
        running = sum(_last_step(spec.run_dir) for job in self.running for spec in job.specs)
        self.bar.update(max(0, self.steps_done + running - self.bar.n))

    def _handle_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name
        for job in self.running:
            if job.process.poll() is None:
                job.process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Run what is left of the grid; 0 if every run finished, 1 if some failed, 75 if stopped by a signal."""
        todo = [spec for spec in self.specs if finished(spec) is None]
        retried = [spec for spec in todo if failure(spec) is not None]
        self.total, self.done_count = len(todo), 0
        done_before = len(self.specs) - len(todo)
        jobs = plan_jobs(todo, self.one_pass, self.group_size)
        self.log(f"sweep: {len(self.specs)} runs in {self.workdir}: {done_before} finished before, "
                 f"{len(todo)} to run ({len(retried)} of them failed before and are tried again) as {len(jobs)} "
                 f"job(s), {self.parallel} at a time" + (" (one pass over the data per job)" if self.one_pass else ""))
        for spec in todo:
            write_run_config(spec)
        write_table(self.specs, self.workdir)
        self.running: list[_Job] = []
        self.bar = tqdm(total=sum(int(spec.config.train.steps) for spec in todo), unit="step", desc="sweep",
                        dynamic_ncols=True, file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 60.0,
                        disable=not todo)
        self.steps_done = 0  # by finished jobs
        previous = {sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            queue = list(jobs)
            while queue or self.running:
                free = sorted(set(range(self.parallel)) - {job.slot for job in self.running})
                while queue and free and not self.stop_signal:
                    self.running.append(self._start(queue.pop(0), free.pop(0)))
                if self.stop_signal and not self.running:
                    break
                time.sleep(0.2)
                for job in list(self.running):
                    code = job.process.poll()
                    if code is not None:
                        self.running.remove(job)
                        self.steps_done += sum(_last_step(spec.run_dir) for spec in job.specs)
                        self.bar.clear()
                        self._finish(job, code)
                        write_table(self.specs, self.workdir)
                self._update_bar()
        finally:
            self.bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        table = write_table(self.specs, self.workdir)
        failed = [row["run"] for row in table if row["status"] == "failed"]
        finished_count = sum(row["status"] == "done" for row in table)
        where = f"{os.path.join(self.workdir, TABLE_JSONL)} and {TABLE_CSV}"
        if self.stop_signal:
            self.log(f"sweep stopped by {self.stop_signal}: {finished_count} of {len(self.specs)} runs finished; "
                     f"running ones saved their checkpoints. Run the same command again to continue. Table: {where}")
            return EXIT_REQUEUE
        if failed:
            self.log(f"sweep finished with {len(failed)} failed run(s) of {len(self.specs)}: {', '.join(failed)}. "
                     f"Errors are in the table ({where}) and logs/; run the same command again to retry them.")
            return EXIT_SOME_FAILED
        self.log(f"sweep finished: all {len(self.specs)} runs done. Table: {where}")
        return 0

"""Two real processes joined by `jax.distributed` train like one process.

Each process is a `python -m saejax.cli train` with 4 simulated CPU devices,
joined over the loopback interface, once from SLURM's variables (as srun sets
them) and once from SAEJAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID;
the reference is one process with 8 devices and the same config. Across the
two processes run: process-local batches, the sharded step's collectives
(gloo), orbax's sharded async checkpoints (each process writes its shards), the
preemption request agreed across processes, the exported sae.safetensors
(each process writes its shards) and metrics/results written by process 0.
Another runs launch/slurm.sh's job script with an srun that starts two
tasks here: the whole chain down to `saejax sweep --point` and its results table.

Equal, not bit-identical: the cross-process all-reduce sums the devices'
partial sums in another order than the in-process one (a psum over 8 devices
of [1, 1e8, 1, -1e8, 1, 3, 1e-3, 7] gives 11.001 in one process and 9.0 over two),
so float32 results differ in the last bits: after 30 steps by at most 1.5e-7
(parameters are ~0.1). The tolerance, 1e-5, is 60x that and 100x below what
one Adam step (lr 1e-3) moves a parameter, so a real error (a shard restored
to the wrong place, a step trained twice or skipped, a wrong batch) fails it.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO
from saejax.errors import EXIT_PEER_LOST, EXIT_REQUEUE
from saejax.export import load_sae

STEPS = 30
ARGS = [
    "--config", "default",
    f"--config.train.steps={STEPS}",
    "--config.sae.n=256",
    "--config.sae.dead_tokens=512",  # latents die within the run, so AuxK runs across processes too
    "--config.data.batch_size=64",
    "--config.sae.init_sample_rows=512",
    "--config.optim.warmup_steps=5",
    "--config.train.log_every=1",
    "--config.train.eval_batches=1",
    "--config.train.progress=false",
    "--config.checkpoint.every_steps=0",
]
LATENTS_SPAN_PROCESSES = ["--config.mesh.data=1", "--config.mesh.model=8"]
DATA_SPLIT_OVER_PROCESSES = ["--config.mesh.data=2", "--config.mesh.model=4"]
RTOL, ATOL = 1e-5, 1e-5
TIMEOUT = 240  # seconds for one run; a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache_dir, **extra) -> dict:
    # A compilation cache shared by the module's runs: the 2-process 1x8 step is compiled once, not three times.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
           "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("XLA_FLAGS", None)  # the test process's simulated devices are not inherited
    for name in [k for k in env if k.startswith(("SAEJAX_", "SLURM_", "TPU_", "MEGASCALE_"))]:
        env.pop(name)
    env.update(extra)
    return env


class Job:
    """Processes of one `saejax train` job, their output in files next to the workdir."""

    def __init__(self, workdir, cache_dir, mesh_args, processes: int, join: str = "explicit",
                 extra_env=None):
        self.workdir, self.logs = str(workdir), []
        self.port = port = _free_port()
        self.procs = []
        for pid in range(processes):
            env = _env(8 // processes, cache_dir, **(extra_env or {}))
            if processes > 1 and join == "explicit":
                env.update(SAEJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SAEJAX_NUM_PROCESSES=str(processes),
                           SAEJAX_PROCESS_ID=str(pid))
            elif processes > 1:  # what srun gives each task of a job step on one node
                env.update(SLURM_JOB_ID="4242", SLURM_NTASKS=str(processes), SLURM_STEP_NUM_TASKS=str(processes),
                           SLURM_PROCID=str(pid), SLURM_LOCALID=str(pid), SLURM_STEP_NUM_NODES=str(processes),
                           SLURM_STEP_NODELIST="localhost", JAX_COORDINATOR_PORT=str(port))
            out, err = f"{self.workdir}.p{pid}.out", f"{self.workdir}.p{pid}.err"
            self.logs.append((out, err))
            with open(out, "w") as stdout, open(err, "w") as stderr:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "saejax.cli", "train", *ARGS, *mesh_args, "--workdir", self.workdir],
                    cwd=REPO, env=env, stdout=stdout, stderr=stderr))

    def output(self, pid: int = 0) -> str:
        with open(self.logs[pid][0]) as f:
            return f.read()

    def report(self) -> str:
        parts = []
        for pid, (out, err) in enumerate(self.logs):
            for path in (out, err):
                with open(path) as f:
                    text = "".join(line for line in f if not line.startswith("[Gloo]"))
                parts.append(f"--- process {pid} {os.path.basename(path)} (exit {self.procs[pid].returncode}):\n{text[-3000:]}")
        return "\n".join(parts)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    def wait(self, expected: int = 0) -> None:
        """Wait for every process; fail on a timeout, or soon after one process fails (its peers
        would otherwise sit in a collective until JAX's heartbeat timeout)."""
        deadline, give_up = time.time() + TIMEOUT, None
        while any(proc.poll() is None for proc in self.procs):
            if give_up is None and any(proc.returncode not in (None, expected) for proc in self.procs):
                give_up = time.time() + 20
            if time.time() > min(deadline, give_up or deadline):
                self.kill()
                pytest.fail(f"{self.workdir}: timed out or a process failed\n{self.report()}")
            time.sleep(0.1)
        codes = [proc.returncode for proc in self.procs]
        assert codes == [expected] * len(codes), f"{self.workdir}: exit codes {codes}\n{self.report()}"


def _metric_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def _assert_same_sae(workdir, reference: "Job") -> None:
    reference.wait()
    got, cfg = load_sae(str(workdir))
    want, _ = load_sae(reference.workdir)
    assert sorted(got) == sorted(want) == ["W_dec", "W_enc", "b_enc", "b_pre"]
    assert cfg["trained_steps"] == STEPS
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == STEPS
    assert _metric_steps(workdir) == list(range(1, STEPS + 1)), "process 0 wrote one metrics row per step"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compilation_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """One process, 8 devices, latents over all 8; started, not awaited: it uses the cores the
    two-process jobs leave idle while they wait on each other."""
    job = Job(tmp_path_factory.mktemp("multihost") / "one_process", cache_dir, LATENTS_SPAN_PROCESSES, processes=1)
    yield job
    job.kill()  # a no-op once it has finished


def test_two_processes_with_the_latents_split_across_both_train_like_one(reference, cache_dir, tmp_path):
    """Joined from SLURM's variables, as each task of an `srun` job step (nodes simulated by processes)."""
    workdir = tmp_path / "two_processes"
    job = Job(workdir, cache_dir, LATENTS_SPAN_PROCESSES, processes=2, join="slurm")
    job.wait()
    out = job.output(0)
    assert "devices        8 x cpu in 2 process(es); mesh data=1 x model=8 (32 latents" in out
    assert "done: 30 steps" in out
    with open(job.logs[0][1]) as f:
        assert f"distributed: process 0 of 2 via SLURM, coordinator localhost:{job.port}\n" in f.read()
    assert "plan:" not in job.output(1), "only process 0 prints"
    _assert_same_sae(workdir, reference)
    state = workdir / "checkpoints" / str(STEPS) / "state"
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir(), "each process wrote its shards"


def test_preempt_one_process_both_save_then_resume_on_another_mesh(reference, cache_dir, tmp_path):
    """SIGTERM to process 1 only: both processes agree, save, exit 75; the restart restores and finishes.

    The preempted run splits the batch over the processes (mesh 2x4), the
    resumed one the latents (1x8): the checkpoint both processes wrote is
    restored onto another mesh, and the result still equals one process's.
    """
    workdir = tmp_path / "preempted"
    job = Job(workdir, cache_dir, DATA_SPLIT_OVER_PROCESSES, processes=2)
    deadline = time.time() + TIMEOUT
    while len(_metric_steps(workdir)) < 8:
        if any(proc.poll() is not None for proc in job.procs) or time.time() > deadline:
            job.kill()
            pytest.fail(f"the run ended or hung before it could be preempted\n{job.report()}")
        time.sleep(0.05)
    job.procs[1].send_signal(signal.SIGTERM)
    job.wait(expected=EXIT_REQUEUE)
    with open(job.logs[0][1]) as f:
        assert f"distributed: process 0 of 2 via SAEJAX_COORDINATOR_ADDRESS=127.0.0.1:{job.port}\n" in f.read()
    steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert len(steps) == 1 and 8 <= steps[0] < STEPS, f"one preemption checkpoint: {steps}\n{job.report()}"
    saved = steps[0]
    assert re.search(rf"SIGTERM on process 1: saved step {saved}\b", job.output(0)), job.report()
    assert not (workdir / "results.json").exists()

    resumed = Job(workdir, cache_dir, LATENTS_SPAN_PROCESSES, processes=2)
    resumed.wait()
    assert f"resumed from {workdir / 'checkpoints'}/{saved}" in resumed.output(0)
    _assert_same_sae(workdir, reference)


FAKE_SRUN = """#!/usr/bin/env bash
# srun for one node: FAKE_NTASKS copies of the command with a job step's SLURM variables.
n=${FAKE_NTASKS:-2} code=0 pids=()
for ((i = 0; i < n; i++)); do
  SLURM_STEP_NUM_TASKS=$n SLURM_NTASKS=$n SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NUM_NODES=$n \\
    SLURM_STEP_NODELIST=localhost "$@" > "$FAKE_TASK_LOG.$i" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { c=$?; if [[ $c -gt $code ]]; then code=$c; fi; }; done
exit $code
"""
TINY_STUDY = """from saejax.configs.default import get_config as default_config


def get_config():
    config = default_config()
    # The settings of ARGS, so the compiled step comes from the compilation cache.
    config.sae.n, config.sae.dead_tokens = 256, 512
    config.data.batch_size, config.sae.init_sample_rows = 64, 512
    config.optim.warmup_steps = 5
    config.train.steps, config.train.log_every, config.train.eval_batches, config.train.progress = 10, 1, 1, False
    config.checkpoint.every_steps = 0
    config.mesh.data, config.mesh.model = 1, 8
    return config


def get_hyper(hyper):
    return hyper.product([hyper.sweep("sae.k", [4, 8])])
"""


def test_slurm_array_task_runs_its_grid_point_on_two_processes(cache_dir, tmp_path):
    """launch/slurm.sh's job script, run as array task 1 with an srun that starts two tasks on this machine.

    The whole chain: job script -> srun -> `saejax sweep --point 1` in each task ->
    jax.distributed joined from SLURM's variables -> one run over 8 devices in 2
    processes -> the sweep's results table.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    study, workdir = tmp_path / "tiny.py", tmp_path / "sweep"
    study.write_text(TINY_STUDY)
    env = _env(4, cache_dir, PATH=f"{bin_dir}:{os.environ['PATH']}", PARTITION="cpu", GPUS_PER_NODE="0",
               SAEJAX=os.path.join(os.path.dirname(sys.executable), "saejax"), FAKE_TASK_LOG=str(tmp_path / "task"))
    dry = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sh"), "--dry-run", str(study), str(workdir)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert dry.returncode == 0, dry.stderr
    env.update(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="900", SLURM_JOB_ID="901", JAX_COORDINATOR_PORT=str(_free_port()))
    job = subprocess.Popen(["bash", str(workdir / "slurm" / "sweep.sbatch")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
    logs = "\n".join(f"--- task {i}:\n" + (tmp_path / f"task.{i}").read_text()[-3000:] for i in range(2)
                     if (tmp_path / f"task.{i}").exists())
    assert job.returncode == 0, f"{output}\n{logs}"
    assert "distributed: process 0 of 2 via SLURM, coordinator localhost:" in (tmp_path / "task.0").read_text()
    assert "8 x cpu in 2 process(es); mesh data=1 x model=8" in (tmp_path / "task.0").read_text()
    with open(workdir / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(row["point"], row["status"]) for row in rows] == [({"sae.k": 8}, "done")], rows
    tensors, cfg = load_sae(os.path.join(workdir, rows[0]["run_dir"]))
    assert cfg["k"] == 8 and cfg["trained_steps"] == 10 and tensors["W_enc"].shape == (64, 256)


PEER_TIMEOUT = 10


def _errors(job: Job, pid: int) -> list[str]:
    with open(job.logs[pid][1]) as f:
        return [line.rstrip("\n") for line in f if "error:" in line]


@pytest.mark.slow
def test_a_killed_process_makes_the_other_exit_with_a_message_within_the_bound(cache_dir, tmp_path):
    """SIGKILL to process 1 mid-run: process 0, blocked in the step's collectives, exits EXIT_PEER_LOST."""
    workdir = tmp_path / "killed"
    job = Job(workdir, cache_dir, [*DATA_SPLIT_OVER_PROCESSES, "--config.train.steps=100000"], processes=2,
              extra_env={"SAEJAX_PEER_TIMEOUT_S": str(PEER_TIMEOUT)})
    deadline = time.time() + TIMEOUT
    while len(_metric_steps(workdir)) < 5:
        if any(proc.poll() is not None for proc in job.procs) or time.time() > deadline:
            job.kill()
            pytest.fail(f"the run ended or hung before the kill\n{job.report()}")
        time.sleep(0.05)
    job.procs[1].kill()
    killed = time.time()
    try:
        code = job.procs[0].wait(timeout=PEER_TIMEOUT + 20)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"process 0 still running {PEER_TIMEOUT + 20} s after its peer was killed\n{job.report()}")
    assert time.time() - killed < PEER_TIMEOUT + 20
    assert code == EXIT_PEER_LOST, job.report()
    assert _errors(job, 0) == [
        f"saejax train: error: process 1 of 2 has not answered for {PEER_TIMEOUT} s: it was killed, crashed or its "
        "host is down. The last complete checkpoint is intact; restart the whole job to resume "
        "(SAEJAX_PEER_TIMEOUT_S sets this wait)"], job.report()


@pytest.mark.slow
def test_nan_in_one_processs_rows_stops_both_with_the_same_error(cache_dir, tmp_path):
    from saejax.data.npy import NpySource

    path = tmp_path / "acts.npy"
    acts = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
    np.save(path, acts)
    source = NpySource(str(path), 64, seed=0, eval_fraction=0.01)
    sampled = set(np.random.default_rng([0, 0x5A3]).choice(source.train_rows, size=512, replace=False).tolist())
    earlier = set(source.row_ids(0, 64 * 5, "train", 0, 64 * 5).tolist())  # steps 0-4 (all rows)
    poisoned = next(int(r) for r in source.row_ids(5, 64, "train", 32, 64) if r not in sampled | earlier)
    acts[poisoned, 3] = np.nan
    np.save(path, acts)
    workdir = tmp_path / "nan"
    job = Job(workdir, cache_dir, [*DATA_SPLIT_OVER_PROCESSES, "--config.data.source=npy",
                                   f"--config.data.path={path}"], processes=2)
    job.wait(expected=2)
    first, second = _errors(job, 0), _errors(job, 1)
    assert first == second and len(first) == 1, job.report()
    assert first[0].startswith(f"saejax train: error: process 1: train batch for step 5 from npy({path}"), job.report()
    assert "Traceback" not in job.report()


def test_export_writes_each_shard_into_its_slice(tmp_path):
    """The per-shard writer behind sae.safetensors (in this process, 8 devices), every layout the SAEs use.

    Each distinct shard is written once (replica 0), as contiguous runs of exactly its own bytes.
    """
    import jax
    import ml_dtypes
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from safetensors.numpy import load_file

    from saejax.export import write_safetensors

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    layouts = {"W_enc": ((6, 16), P(None, "model")), "W_dec": ((16, 6), P("model")), "b_enc": ((16,), P("model")),
               "b_pre": ((5,), P()), "both_axes": ((4, 8), P("data", "model")), "three_d": ((2, 8, 3), P(None, "model")),
               "scalar": ((), P())}
    tensors = {name: jax.device_put(rng.standard_normal(shape).astype(np.float32), NamedSharding(mesh, spec))
               for name, (shape, spec) in layouts.items()}
    tensors["bf16"] = jax.device_put(np.arange(16, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 8),
                                     NamedSharding(mesh, P(None, "model")))
    tensors["host"] = np.arange(7, dtype=np.int32)
    path = tmp_path / "x.safetensors"
    write_safetensors(str(path), tensors, {"format": "test"})
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], np.asarray(array), err_msg=name)
    assert not os.path.exists(f"{path}.tmp")

"""Kill and resume: a run killed (SIGKILL) or preempted (SIGTERM) and resumed ends bit-identical.

Each run is a real `python -m saejax train` process on one CPU device.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, run_cli
from saejax.errors import EXIT_REQUEUE

STEPS = 300
ARGS = [
    "--config", "default",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_batches=1",
    "--config.checkpoint.every_steps=25",
    "--config.mesh.model=1",
]
TIMING_KEYS = {"tokens_per_sec", "elapsed_s"}


def _start(workdir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "saejax", "train", *ARGS, "--workdir", str(workdir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _metric_rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            pytest.fail(f"run ended before the test could interrupt it:\n{process.communicate()[1][-3000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("timed out waiting for the run")


def _final_state(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as manager:
        restored = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return {"/".join(str(k) for k in path): np.asarray(leaf)
            for path, leaf in _flatten(restored["state"])}


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (key,))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flatten(value, prefix + (i,))
    else:
        yield prefix, tree


def _assert_same_run(workdir, reference_dir):
    ref_state, state = _final_state(reference_dir), _final_state(workdir)
    assert sorted(state) == sorted(ref_state)
    assert any(key.startswith("opt_state") for key in state)
    for key in ref_state:  # params, Adam moments, counters, dead-latent stats: bit-identical
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    rows = strip(_metric_rows(workdir))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one metrics row per step, no duplicates"
    assert rows == strip(_metric_rows(reference_dir))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli("train", *ARGS, "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(reference_run, tmp_path):
    workdir = tmp_path / "killed"
    process = _start(workdir)
    _wait_for(lambda: any(s >= 100 for s in _finished_steps(workdir)), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _finished_steps(workdir)
    assert killed_at and max(killed_at) < STEPS, "the run must have been killed part-way"

    resumed = run_cli("train", *ARGS, "--workdir", str(workdir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/{max(killed_at)}" in resumed.stdout
    _assert_same_run(workdir, reference_run)


@pytest.mark.slow
def test_sigterm_saves_exits_for_requeue_and_resumes(reference_run, tmp_path):
    workdir = tmp_path / "preempted"
    process = _start(workdir)
    _wait_for(lambda: len(_metric_rows(workdir)) >= 40, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_REQUEUE, stderr[-3000:]
    saved = int(re.search(r"SIGTERM: saved step (\d+)", stdout).group(1))
    assert 40 <= saved < STEPS
    assert max(_finished_steps(workdir)) == saved, "the preemption checkpoint is complete on disk"
    assert not os.path.exists(workdir / "results.json")

    resumed = run_cli("train", *ARGS, "--workdir", str(workdir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(workdir, reference_run)
    # Running a finished run again changes nothing.
    again = run_cli("train", *ARGS, "--workdir", str(workdir))
    assert again.returncode == 0 and "already holds a finished run" in again.stdout

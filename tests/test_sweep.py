"""Sweeps: grids, run naming, the runner's table, idempotence, failures, kills, one pass over the data."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, run_cli, small_config
from saejax.errors import ConfigError, TrainingDivergedError
from saejax.export import load_sae
from saejax.sweep import hyper
from saejax.sweep.runner import plan_jobs
from saejax.sweep.study import load_study, run_name, specs
from saejax.sweep.table import COLUMNS
from saejax.trainer import train_and_evaluate, train_group

TINY_STUDY = '''
from saejax.config import base_config

def get_config():
    c = base_config()
    c.sae.d = 16
    c.sae.k_aux = 16
    c.sae.init_sample_rows = 512
    c.data.batch_size = 64
    c.data.synthetic.num_features = 64
    c.data.synthetic.avg_active = 4.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.steps = {steps}
    c.train.log_every = 5
    c.train.eval_batches = 1
    c.train.progress = False
    c.checkpoint.every_steps = {every}
    c.checkpoint.async_save = False
    c.mesh.model = 1
    return c

def get_hyper(h):
    return {grid}
'''
GRID = 'h.product([h.sweep("sae.n", [64, 128]), h.sweep("sae.k", [4, 8])])'


def write_study(tmp_path, grid=GRID, steps=20, every=10, name="tiny.py"):
    path = tmp_path / name
    path.write_text(TINY_STUDY.format(grid=grid, steps=steps, every=every))
    return str(path)


def read_table(workdir):
    with open(os.path.join(workdir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- grids and naming


def test_hyper_product_zip_chain_fixed():
    grid = hyper.product([hyper.sweep("config.sae.n", [1, 2]), hyper.sweep("sae.k", [3, 4])])
    assert grid == [{"sae.n": 1, "sae.k": 3}, {"sae.n": 1, "sae.k": 4}, {"sae.n": 2, "sae.k": 3}, {"sae.n": 2, "sae.k": 4}]
    assert hyper.zipit([hyper.sweep("a", [1, 2]), hyper.sweep("b", [5, 6])]) == [{"a": 1, "b": 5}, {"a": 2, "b": 6}]
    assert hyper.chainit([hyper.fixed("a", 1), hyper.sweep("b", [2])]) == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError, match="different lengths"):
        hyper.zipit([hyper.sweep("a", [1, 2]), hyper.sweep("b", [5])])
    with pytest.raises(ValueError, match=r"key\(s\) \['a'\] set twice"):
        hyper.product([hyper.sweep("a", [1]), hyper.fixed("a", 2)])


def test_specs_name_hash_and_validate_every_point(tmp_path):
    study = load_study(write_study(tmp_path))
    grid = specs(study, str(tmp_path / "w"))
    assert [s.name.rsplit("-", 1)[0] for s in grid] == ["n64-k4", "n64-k8", "n128-k4", "n128-k8"]
    assert [(s.config.sae.n, s.config.sae.topk.k) for s in grid] == [(64, 4), (64, 8), (128, 4), (128, 8)]
    assert all(s.run_dir == str(tmp_path / "w" / "runs" / s.name) for s in grid)
    assert run_name({"sae.n": 64, "optim.lr": 0.001}, "abcdef123456") == "n64-lr0.001-abcdef12"
    # The hash is stable, ignores progress bars and checkpoint cadence, follows every computing key.
    again = specs(study, str(tmp_path / "w"), [("train.progress", "true"), ("checkpoint.every_steps", "5")])
    assert [s.config_hash for s in again] == [s.config_hash for s in grid]
    longer = specs(study, str(tmp_path / "w"), [("train.steps", "40")])
    assert not {s.config_hash for s in longer} & {s.config_hash for s in grid}

    with pytest.raises(ConfigError, match=r"--config.sae.n is swept by .*tiny.py; change the grid in the study file"):
        specs(study, str(tmp_path / "w"), [("sae.n", "32")])
    bad = load_study(write_study(tmp_path, grid='h.product([h.sweep("sae.nn", [64])])', name="bad.py"))
    with pytest.raises(ConfigError, match=r"grid point 0 of .*bad.py: unknown config key 'sae.nn'. Did you mean 'n'"):
        specs(bad, str(tmp_path / "w"))
    twice = load_study(write_study(tmp_path, grid='h.chainit([h.sweep("sae.n", [64, 64])])', name="twice.py"))
    with pytest.raises(ConfigError, match="grid points 0 and 1 of .* are the same run"):
        specs(twice, str(tmp_path / "w"))
    (tmp_path / "nohyper.py").write_text("def get_config():\n    return None\n")
    with pytest.raises(ConfigError, match=r"lacks get_hyper\(\)"):
        load_study(str(tmp_path / "nohyper.py"))
    with pytest.raises(ConfigError, match=r"study file 'nope.py' not found"):
        load_study("nope.py")


def test_one_pass_groups_runs_that_share_data(tmp_path):
    grid = specs(load_study(write_study(tmp_path, grid='h.product([h.sweep("seed", [0, 1]), h.sweep("sae.n", [64, 128, 256])])')),
                 str(tmp_path / "w"))
    assert [[s.index for s in job] for job in plan_jobs(grid, False, 0)] == [[0], [1], [2], [3], [4], [5]]
    assert [[s.index for s in job] for job in plan_jobs(grid, True, 0)] == [[0, 1, 2], [3, 4, 5]]
    assert [[s.index for s in job] for job in plan_jobs(grid, True, 2)] == [[0, 1], [2], [3, 4], [5]]


# ----------------------------------------------------------------------------- one pass, in process


def test_train_group_equals_separate_runs_and_isolates_a_divergence(tmp_path):
    configs = [small_config(**{"sae.n": 128, "sae.k": 4}), small_config(**{"sae.n": 256, "sae.k": 8}),
               small_config(**{"sae.n": 256, "optim.lr": 1e30})]
    dirs = [str(tmp_path / f"group{i}") for i in range(3)]
    outcomes = train_group(configs, dirs, raise_errors=False)
    assert isinstance(outcomes[2], TrainingDivergedError)
    for i in range(2):
        separate = str(tmp_path / f"alone{i}")
        alone = train_and_evaluate(configs[i], separate)
        assert outcomes[i]["eval_metrics"] == alone["eval_metrics"]
        grouped_tensors, _ = load_sae(dirs[i])
        alone_tensors, _ = load_sae(separate)
        for name in alone_tensors:
            np.testing.assert_array_equal(grouped_tensors[name], alone_tensors[name])
    with pytest.raises(ConfigError, match="runs trained in one pass must share data"):
        train_group([configs[0], small_config(**{"data.batch_size": 32})], dirs[:2])


# ----------------------------------------------------------------------------- the runner


def test_sweep_table_rerun_failure_and_retry(tmp_path):
    grid = 'h.chainit([h.product([h.sweep("sae.n", [64, 128]), h.sweep("sae.k", [4])]), h.fixed("optim.lr", 1e30)])'
    study = write_study(tmp_path, grid=grid, steps=10, every=0)
    workdir = str(tmp_path / "sweep")
    listed = run_cli("sweep", study, "--workdir", workdir, "--list")
    assert listed.returncode == 0, listed.stderr
    lines = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(i, json.loads(p)) for i, _, p in lines] == [("0", {"sae.k": 4, "sae.n": 64}), ("1", {"sae.k": 4, "sae.n": 128}),
                                                         ("2", {"optim.lr": 1e30})]
    first = run_cli("sweep", study, "--workdir", workdir)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "sweep finished with 1 failed run(s) of 3: lr1e+30-" in first.stdout
    table = read_table(workdir)
    assert [row["status"] for row in table] == ["done", "done", "failed"]
    assert all(list(row) == list(COLUMNS) for row in table)
    failed = table[2]
    assert failed["run"].startswith("lr1e+30-") and "training diverged at step" in failed["error"] and failed["nmse"] is None
    for row, name in zip(table[:2], [lines[0][1], lines[1][1]], strict=True):
        with open(os.path.join(workdir, "runs", name, "results.json")) as f:
            results = json.load(f)
        assert row["run"] == name and row["n"] == results["config"]["sae"]["n"] and row["k"] == 4
        assert row["nmse"] == results["eval_metrics"]["nmse"] and row["l0"] == results["eval_metrics"]["l0"]
        assert row["dead_fraction"] == results["final_train_metrics"]["dead_fraction"]
        assert row["tokens"] == 640 and row["steps"] == 10 and row["flops"] == results["total_flops"] > 0
        assert row["wall_time_s"] == results["wall_time_s"] and name.endswith(row["config_hash"][:8])
    with open(os.path.join(workdir, "results.csv")) as f:
        csv_lines = f.read().splitlines()
    assert csv_lines[0] == ",".join(COLUMNS) and len(csv_lines) == 4

    # Rerun: finished runs are skipped, the failed one is tried again (and fails again), no duplicate rows.
    done_mtime = os.path.getmtime(os.path.join(workdir, "runs", lines[0][1], "results.json"))
    second = run_cli("sweep", study, "--workdir", workdir)
    assert second.returncode == 1
    assert "2 finished before, 1 to run (1 of them failed before and are tried again)" in second.stdout
    assert os.path.getmtime(os.path.join(workdir, "runs", lines[0][1], "results.json")) == done_mtime
    assert [row["run"] for row in read_table(workdir)] == [row["run"] for row in table]

    # One point in this process (as a SLURM array task runs it): already finished, or out of range.
    point = run_cli("sweep", study, "--workdir", workdir, "--point", "1")
    assert point.returncode == 0 and "has finished already" in point.stdout
    out_of_range = run_cli("sweep", study, "--workdir", workdir, "--point", "7")
    assert out_of_range.returncode == 2
    assert "--point 7 is out of range: the grid has 3 points (0..2)" in out_of_range.stderr


def test_sweep_point_runs_one_run_and_updates_the_table(tmp_path):
    study = write_study(tmp_path, steps=10, every=0)
    workdir = str(tmp_path / "sweep")
    result = run_cli("sweep", study, "--workdir", workdir, "--point", "2")
    assert result.returncode == 0, result.stderr
    table = read_table(workdir)
    assert [(row["n"], row["k"], row["status"]) for row in table] == [(128, 4, "done")]


def test_parallel_jobs_and_gpu_slots(tmp_path, monkeypatch):
    study = write_study(tmp_path, grid='h.sweep("sae.n", [64, 128])', steps=10, every=0)
    workdir = str(tmp_path / "sweep")
    result = run_cli("sweep", study, "--workdir", workdir, "--parallel", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "as 2 job(s), 2 at a time" in result.stdout
    assert [(row["n"], row["status"]) for row in read_table(workdir)] == [(64, "done"), (128, "done")]

    from saejax.sweep.runner import Runner

    grid = specs(load_study(study), workdir)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert Runner(grid, workdir, parallel=2, gpus_per_run=2).gpu_slots == ["4,5", "6,7"]
    with pytest.raises(ConfigError, match=r"--parallel=3 x --gpus-per-run=2 needs 6 GPUs; CUDA_VISIBLE_DEVICES lists 4"):
        Runner(grid, workdir, parallel=3, gpus_per_run=2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert Runner(grid, workdir, parallel=2, gpus_per_run=1).gpu_slots == ["0", "1"]


def _start_sweep(study, workdir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "saejax", "sweep", study, "--workdir", workdir],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


@pytest.mark.slow
def test_killed_sweep_restarts_without_redoing_runs_or_duplicating_rows(tmp_path):
    """SIGKILL the runner while its second run trains; the rerun resumes that run and finishes the grid."""
    study = write_study(tmp_path, grid='h.sweep("sae.n", [64, 128, 256])', steps=400, every=20)
    workdir = str(tmp_path / "sweep")
    runner = _start_sweep(study, workdir)
    names = [line.split("\t")[1] for line in run_cli("sweep", study, "--workdir", workdir, "--list").stdout.splitlines()]
    second_metrics = os.path.join(workdir, "runs", names[1], "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(second_metrics) and os.path.getsize(second_metrics) > 0
               and os.path.isdir(os.path.join(workdir, "runs", names[1], "checkpoints", "40"))):
        assert runner.poll() is None and time.time() < deadline, runner.stdout.read() if runner.poll() is not None else "timeout"
        time.sleep(0.2)
    first_results = os.path.join(workdir, "runs", names[0], "results.json")
    first_mtime = os.path.getmtime(first_results)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert [row["run"] for row in read_table(workdir)] == [names[0]]

    rerun = run_cli("sweep", study, "--workdir", workdir)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 finished before, 2 to run" in rerun.stdout
    assert os.path.getmtime(first_results) == first_mtime
    with open(os.path.join(workdir, "logs", f"{names[1]}.log")) as f:
        assert "resumed from" in f.read()
    table = read_table(workdir)
    assert [row["run"] for row in table] == names and [row["status"] for row in table] == ["done"] * 3
    assert [row["steps"] for row in table] == [400] * 3


# ----------------------------------------------------------------------------- shipped studies


@pytest.mark.parametrize("study,devices,count", [("minilm_cpu.py", 1, 24), ("gpt2_small.py", 8, 30), ("sae_16m.py", 64, 1),
                                                 ("families_minilm.py", 1, 24)])
def test_shipped_studies_are_valid_grids(tmp_path, study, devices, count):
    from saejax.config import validate

    loaded = load_study(os.path.join(REPO, "experiments", study))
    grid = specs(loaded, str(tmp_path / "w"), [("data.path", "/data/acts")])
    assert len(grid) == count
    for spec in grid:
        validate(spec.config, devices)
    if study == "minilm_cpu.py":  # without a data.path the study trains on its own store
        assert specs(loaded, str(tmp_path / "w"))[0].config.data.path == str(tmp_path / "w" / "acts")
    if study == "families_minilm.py":  # every family of the registry is on the frontier, but
        from saejax.models import FAMILIES

        # BAE (L0 in the hundreds) and the RSAE (a fine-tuned teacher) have their own studies:
        # experiments/bae_untangle.py against TopK/ReLU/JumpReLU, experiments/rsae_minilm.py.
        assert {s.config.sae.family for s in grid} == set(FAMILIES) - {"binary", "rational"}
    if study == "gpt2_small.py":
        assert {s.config.sae.n for s in grid} == {2**p for p in range(15, 21)}
        assert {s.config.sae.topk.k for s in grid} == {8, 16, 32, 64, 128}


"""The command line as a user runs it: plan for a topology we don't have, train, budgets."""

import json

from helpers import run_cli
from saejax.errors import EXIT_OVER_BUDGET

D, N, K, B, DEVICES = 4096, 2**24, 32, 4096, 64


def test_plan_16m_latents_on_64_simulated_devices(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("plan", "--config", "plan_16m", "--devices", str(DEVICES), "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh data=1 x model=64 (262,144 latents" in result.stdout
    plan = json.loads(out.read_text())
    assert plan["num_devices"] == DEVICES
    n_local = N // DEVICES
    # Parameters split over the 64 devices exactly: W_enc, W_dec, b_enc shards and the replicated b_pre.
    assert plan["bytes_per_device"]["params"] == 4 * (2 * D * n_local + n_local + D)
    assert plan["bytes_per_device"]["optimizer_state"] == 2 * plan["bytes_per_device"]["params"] + 4 * 2
    assert plan["peak_bytes"] <= 80e9
    # Only top-k candidates travel: the largest all-gather is the AuxK candidates,
    # B x k_aux x shards (k_aux = 2048 for d = 4096), never the (B, n) pre-activations.
    k_aux = 2048
    assert plan["largest_all_gather"] <= B * k_aux * DEVICES
    assert plan["largest_all_gather"] < plan["batch_by_latents"] < B * N
    assert plan["flops_per_step"] > 2 * B * D * N


def test_plan_over_budget_exits_with_a_clear_message():
    result = run_cli("plan", "--config", "plan_16m", "--devices", str(DEVICES), "--config.device_memory_gb=20")
    assert result.returncode == EXIT_OVER_BUDGET
    assert "over the budget of device_memory_gb=20" in result.stderr
    assert "EXCEEDED" in result.stdout


def test_train_prints_results_and_where_they_are(tmp_path):
    result = run_cli("train", "--config", "default:steps=60", "--config.train.log_every=20",
                     "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("plan: topk SAE d=64 n=1,024 k=8")
    assert "done: 60 steps, 61,440 tokens" in result.stdout
    assert "nmse" in result.stdout and "L0 8.00" in result.stdout and "dead fraction 0.0000" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert f"results: {tmp_path / 'results.json'}" in result.stdout
    assert results["files"]["sae"] == str(tmp_path / "sae.safetensors")
    assert (tmp_path / "cfg.json").exists()


def test_local_launch_script_dry_run_and_missing_workdir():
    import os
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "local.sh")
    env = {**os.environ, "SAEJAX_CPU_DEVICES": "8"}
    dry = subprocess.run(["bash", script, "--dry-run", "runs/x", "default:n=2048", "--config.sae.k=4"],
                         capture_output=True, text=True, env=env)
    assert dry.returncode == 0
    assert dry.stdout.strip() == ("env PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8 saejax train "
                                  "--config default:n=2048 --workdir runs/x --config.sae.k=4")
    missing = subprocess.run(["bash", script], capture_output=True, text=True)
    assert missing.returncode != 0 and "usage: launch/local.sh" in missing.stderr
    bad = subprocess.run(["bash", script, "--dry-run", "runs/x"], capture_output=True, text=True,
                         env={**os.environ, "SAEJAX_RETRIES": "many"})
    assert bad.returncode == 2 and "SAEJAX_RETRIES must be a non-negative integer" in bad.stderr

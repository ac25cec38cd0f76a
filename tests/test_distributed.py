"""initialize_from_env: which environment gives which jax.distributed.initialize call, and the errors.

`jax.distributed.initialize` is replaced by a recorder; nothing joins anything.
"""

import jax
import pytest
from jax._src.clusters.slurm_cluster import SlurmCluster

from saejax import distributed
from saejax.distributed import first_host, initialize_from_env
from saejax.errors import ConfigError

EXPLICIT = {"SAEJAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "SAEJAX_NUM_PROCESSES": "4", "SAEJAX_PROCESS_ID": "2"}
SLURM_STEP = {
    "SLURM_JOB_ID": "12345",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}
SLURM_PORT = 12345 % 4096 + 61440  # JAX's rule: job id into the ephemeral range


@pytest.fixture
def calls(monkeypatch):
    """Record jax.distributed.initialize calls and config updates instead of making them."""
    recorded = {"initialize": [], "config": []}
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: recorded["initialize"].append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda name, value: recorded["config"].append((name, value)))
    return recorded


def explicit_call(coordinator, num, pid, local_device_ids=None):
    return ((coordinator, num, pid), {"local_device_ids": local_device_ids, "cluster_detection_method": "deactivate"})


def test_single_process_initializes_nothing(calls):
    assert initialize_from_env({}) is None
    assert initialize_from_env({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert initialize_from_env({"TPU_WORKER_HOSTNAMES": "tpu-worker-0"}) is None
    assert calls == {"initialize": [], "config": []}


def test_explicit_variables(calls, capsys):
    found = initialize_from_env(EXPLICIT)
    assert found == {"source": "SAEJAX_COORDINATOR_ADDRESS", "coordinator": "10.0.0.1:1234",
                     "num_processes": 4, "process_id": 2}
    assert calls["initialize"] == [explicit_call("10.0.0.1:1234", 4, 2)]
    assert calls["config"] == [("jax_cpu_collectives_implementation", "gloo")]
    assert capsys.readouterr().err == "", "only process 0 logs"


def test_explicit_variables_process_0_logs_one_line_and_local_devices(calls, capsys):
    env = {**EXPLICIT, "SAEJAX_PROCESS_ID": "0", "SAEJAX_LOCAL_DEVICE_IDS": "2,3"}
    found = initialize_from_env(env)
    assert found["local_device_ids"] == [2, 3]
    assert calls["initialize"] == [explicit_call("10.0.0.1:1234", 4, 0, [2, 3])]
    assert capsys.readouterr().err == "distributed: process 0 of 4 via SAEJAX_COORDINATOR_ADDRESS=10.0.0.1:1234\n"


def test_explicit_variables_win_over_slurm(calls):
    initialize_from_env({**SLURM_STEP, **EXPLICIT})
    assert calls["initialize"] == [explicit_call("10.0.0.1:1234", 4, 2)]


@pytest.mark.parametrize("present, message", [
    (["SAEJAX_COORDINATOR_ADDRESS"],
     "SAEJAX_COORDINATOR_ADDRESS is set but SAEJAX_NUM_PROCESSES and SAEJAX_PROCESS_ID are not"),
    (["SAEJAX_NUM_PROCESSES", "SAEJAX_PROCESS_ID"],
     "SAEJAX_NUM_PROCESSES and SAEJAX_PROCESS_ID are set but SAEJAX_COORDINATOR_ADDRESS is not"),
])
def test_explicit_variables_all_or_none(calls, present, message):
    with pytest.raises(ConfigError) as error:
        initialize_from_env({name: EXPLICIT[name] for name in present})
    assert str(error.value) == (
        f"{message}: a multi-process job needs all of SAEJAX_COORDINATOR_ADDRESS=HOST:PORT (process 0's address), "
        "SAEJAX_NUM_PROCESSES=N and SAEJAX_PROCESS_ID=0..N-1 (different in every process); "
        "set the missing ones or unset them all")
    assert calls["initialize"] == []


@pytest.mark.parametrize("override, message", [
    ({"SAEJAX_PROCESS_ID": "4"}, "SAEJAX_PROCESS_ID=4 must be below SAEJAX_NUM_PROCESSES=4 (ids are 0..3)"),
    ({"SAEJAX_PROCESS_ID": "-1"}, "SAEJAX_PROCESS_ID='-1' must be at least 0"),
    ({"SAEJAX_NUM_PROCESSES": "two"}, "SAEJAX_NUM_PROCESSES='two' is not an integer"),
    ({"SAEJAX_NUM_PROCESSES": "0"}, "SAEJAX_NUM_PROCESSES='0' must be at least 1"),
    ({"SAEJAX_COORDINATOR_ADDRESS": "10.0.0.1"},
     "SAEJAX_COORDINATOR_ADDRESS='10.0.0.1' must be HOST:PORT (e.g. 10.0.0.1:1234), the address of process 0"),
    ({"SAEJAX_LOCAL_DEVICE_IDS": "0;1"},
     "SAEJAX_LOCAL_DEVICE_IDS='0;1' must be comma-separated device numbers, e.g. 0,1,2,3"),
])
def test_explicit_values_are_checked(calls, override, message):
    with pytest.raises(ConfigError) as error:
        initialize_from_env({**EXPLICIT, **override})
    assert str(error.value) == message
    assert calls["initialize"] == []


def test_slurm_step_one_task_per_node(calls, monkeypatch):
    found = initialize_from_env(SLURM_STEP)
    assert found == {"source": "SLURM", "coordinator": f"gpu007:{SLURM_PORT}", "num_processes": 2, "process_id": 1}
    # All of the node's devices (no local_device_ids), JAX's own detection switched off.
    assert calls["initialize"] == [explicit_call(f"gpu007:{SLURM_PORT}", 2, 1)]
    # Same coordinator as JAX's SLURM detection computes.
    for name, value in SLURM_STEP.items():
        monkeypatch.setenv(name, value)
    assert SlurmCluster.get_coordinator_address(None, None) == f"gpu007:{SLURM_PORT}"


def test_slurm_several_tasks_per_node_get_one_device_each(calls):
    env = {**SLURM_STEP, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    initialize_from_env(env)
    assert calls["initialize"] == [explicit_call(f"gpu007:{SLURM_PORT}", 8, 5, [1])]


def test_slurm_port_override_and_job_nodelist(calls):
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    initialize_from_env({**env, "SLURM_JOB_NODELIST": "node12,node13", "JAX_COORDINATOR_PORT": "7777"})
    assert calls["initialize"] == [explicit_call("node12:7777", 2, 1)]


def test_slurm_batch_script_without_srun_fails_fast(calls):
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NUM_TASKS"}
    with pytest.raises(ConfigError) as error:
        initialize_from_env(env)
    assert str(error.value) == (
        "SLURM job 12345 has SLURM_NTASKS=2 tasks but this process is not in an srun job step "
        "(SLURM_STEP_NUM_TASKS is unset), so its peers would never join: start every task with "
        "`srun saejax ...`, or set SAEJAX_DISTRIBUTED=off to run a single process")
    assert calls["initialize"] == []


def test_slurm_missing_variables(calls):
    env = {k: v for k, v in SLURM_STEP.items() if k not in ("SLURM_PROCID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")}
    with pytest.raises(ConfigError) as error:
        initialize_from_env(env)
    assert str(error.value) == (
        "SLURM job step with 2 tasks but SLURM_PROCID and SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) unset: "
        "cannot tell which process this is or where process 0 runs. Start the tasks with srun, or set "
        "SAEJAX_COORDINATOR_ADDRESS, SAEJAX_NUM_PROCESSES and SAEJAX_PROCESS_ID explicitly")


@pytest.mark.parametrize("env", [
    {"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3"},
    {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"},
    {"SAEJAX_DISTRIBUTED": "jax"},
])
def test_tpu_vm_and_jax_detection_call_initialize_without_arguments(calls, env, monkeypatch):
    from jax._src.distributed import global_state

    def joined(*args, **kwargs):  # what JAX's detection would have found
        calls["initialize"].append((args, kwargs))
        monkeypatch.setattr(global_state, "coordinator_address", "10.0.0.9:8482")
        monkeypatch.setattr(global_state, "num_processes", 4)
        monkeypatch.setattr(global_state, "process_id", 2)

    monkeypatch.setattr(jax.distributed, "initialize", joined)
    found = initialize_from_env(env)
    assert calls["initialize"] == [((), {})]
    assert found["source"].startswith(("TPU VM", "SAEJAX_DISTRIBUTED=jax"))
    assert {k: found[k] for k in ("coordinator", "num_processes", "process_id")} == {
        "coordinator": "10.0.0.9:8482", "num_processes": 4, "process_id": 2}


def test_switched_off_and_bad_mode(calls):
    assert initialize_from_env({**EXPLICIT, "SAEJAX_DISTRIBUTED": "off"}) is None
    assert calls["initialize"] == []
    with pytest.raises(ConfigError, match="SAEJAX_DISTRIBUTED='slurm': use auto"):
        initialize_from_env({"SAEJAX_DISTRIBUTED": "slurm"})


def test_initialize_failure_is_a_config_error(calls, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("jax.distributed.initialize() must be called before any JAX calls")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    with pytest.raises(ConfigError, match=r"could not join the distributed job \(SAEJAX_COORDINATOR_ADDRESS\): "
                                          r"jax.distributed.initialize\(\) must be called"):
        initialize_from_env(EXPLICIT)


def test_already_initialized_is_left_alone(calls, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert initialize_from_env(EXPLICIT)["source"] == "already initialized"
    assert calls["initialize"] == []


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"),
    ("node001,host2", "node001"),
    ("node[001-015],host2", "node001"),
    ("node[007,009-015]", "node007"),
    ("rack[2-3]-gpu[04-05]", "rack2-gpu04"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host, monkeypatch):
    assert first_host(nodelist) == host
    if nodelist.count("[") <= 1:  # the forms JAX's own parser handles agree
        monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
        monkeypatch.setenv("SLURM_JOB_ID", "1")
        assert SlurmCluster.get_coordinator_address(None, None).rsplit(":", 1)[0] == host


def test_detect_reads_os_environ_by_default(calls, monkeypatch):
    for name in list(EXPLICIT) + list(SLURM_STEP) + ["SAEJAX_DISTRIBUTED", "TPU_WORKER_HOSTNAMES",
                                                      "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAEJAX_COORDINATOR_ADDRESS", "h:1")
    with pytest.raises(ConfigError, match="SAEJAX_COORDINATOR_ADDRESS is set but"):
        initialize_from_env()
    assert distributed.detect({}) is None

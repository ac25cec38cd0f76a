"""Join a multi-process (multi-host) job from the environment: `initialize_from_env()`.

Every process of a job runs the same command (`saejax train ...` or
`saejax sweep STUDY --point I`); this module finds out from the environment
which process it is and calls `jax.distributed.initialize` before JAX picks a
backend. Sources, first match wins:

1. `SAEJAX_DISTRIBUTED=off` (or `0`): one process, whatever else is set.
   `SAEJAX_DISTRIBUTED=jax`: `jax.distributed.initialize()` with no arguments,
   i.e. JAX's own cluster detection (a Cloud TPU VM's metadata server, Open MPI,
   ...); `launch/tpu_vm.sh` sets this because a TPU VM's ssh session carries no
   variable saying how many workers there are.
2. Explicit: `SAEJAX_COORDINATOR_ADDRESS` (host:port of process 0),
   `SAEJAX_NUM_PROCESSES`, `SAEJAX_PROCESS_ID`, optionally
   `SAEJAX_LOCAL_DEVICE_IDS` (comma-separated, e.g. `0,1`): all three or none.
3. SLURM: inside an `srun` job step of more than one task. The coordinator is
   the first host of the step's node list on a port derived from the job id
   (the same rule as JAX's own SLURM detection; `JAX_COORDINATOR_PORT`
   overrides it). JAX's detection is not used as is because it restricts every
   process to one GPU (`SLURM_LOCALID`), which is wrong for the one task per
   node, all of its GPUs, that `launch/slurm.sh` starts; here a process is
   restricted to GPU `SLURM_LOCALID` only when a node runs several tasks.
4. TPU VM pod slice / multislice: `TPU_WORKER_HOSTNAMES` (or
   `TPU_PROCESS_ADDRESSES`) naming more than one host, or
   `MEGASCALE_COORDINATOR_ADDRESS`: `jax.distributed.initialize()`, which
   reads the rest itself.
5. Otherwise a single process: nothing is initialized.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping

from saejax.errors import ConfigError

EXPLICIT = ("SAEJAX_COORDINATOR_ADDRESS", "SAEJAX_NUM_PROCESSES", "SAEJAX_PROCESS_ID")
MODE = "SAEJAX_DISTRIBUTED"
# JAX's rule for SLURM: a port in the ephemeral range [61440, 65535] chosen by the job id.
_SLURM_PORT_BASE, _SLURM_PORT_RANGE = 65535 - 2**12 + 1, 2**12


def _int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    value = environ[name]
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise ConfigError(f"{name}={value!r} must be at least {minimum}")
    return number


def _address(value: str, name: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={value!r} must be HOST:PORT (e.g. 10.0.0.1:1234), the address of process 0")
    return value


def _device_ids(environ: Mapping[str, str], name: str = "SAEJAX_LOCAL_DEVICE_IDS") -> list[int] | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        ids = [int(part) for part in value.split(",")]
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be comma-separated device numbers, e.g. 0,1,2,3") from None
    if any(i < 0 for i in ids):
        raise ConfigError(f"{name}={value!r}: device numbers must be non-negative")
    return ids


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-007,010],cpu1' -> 'gpu003', 'a[1-2]-b[5-6]' -> 'a1-b5'."""
    host, i = [], 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            end = nodelist.find("]", i)
            if end < 0:
                raise ConfigError(f"cannot parse the SLURM node list {nodelist!r} (unclosed '[')")
            host.append(re.split(r"[,-]", nodelist[i + 1:end])[0])
            i = end + 1
        else:
            host.append(nodelist[i])
            i += 1
    if not host:
        raise ConfigError(f"cannot parse the SLURM node list {nodelist!r}")
    return "".join(host)


def _names(names: list[str]) -> str:
    return " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]


def _explicit(environ: Mapping[str, str]) -> dict[str, Any] | None:
    present = [name for name in EXPLICIT if environ.get(name, "") != ""]
    if not present:
        return None
    missing = [name for name in EXPLICIT if name not in present]
    if missing:
        raise ConfigError(
            f"{_names(present)} {'is' if len(present) == 1 else 'are'} set but {_names(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: a multi-process job needs all of "
            "SAEJAX_COORDINATOR_ADDRESS=HOST:PORT (process 0's address), SAEJAX_NUM_PROCESSES=N and "
            "SAEJAX_PROCESS_ID=0..N-1 (different in every process); set the missing ones or unset them all"
        )
    num = _int(environ, "SAEJAX_NUM_PROCESSES", minimum=1)
    pid = _int(environ, "SAEJAX_PROCESS_ID")
    if pid >= num:
        raise ConfigError(f"SAEJAX_PROCESS_ID={pid} must be below SAEJAX_NUM_PROCESSES={num} (ids are 0..{num - 1})")
    return {"source": "SAEJAX_COORDINATOR_ADDRESS",
            "coordinator": _address(environ["SAEJAX_COORDINATOR_ADDRESS"], "SAEJAX_COORDINATOR_ADDRESS"),
            "num_processes": num, "process_id": pid, "local_device_ids": _device_ids(environ)}


def _slurm_tasks(environ: Mapping[str, str]) -> int:
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if environ.get(name):
            return _int(environ, name, minimum=1)
    return 1


def _slurm(environ: Mapping[str, str]) -> dict[str, Any] | None:
    if not environ.get("SLURM_JOB_ID") or _slurm_tasks(environ) <= 1:
        return None
    if not environ.get("SLURM_STEP_NUM_TASKS"):
        raise ConfigError(
            f"SLURM job {environ['SLURM_JOB_ID']} has SLURM_NTASKS={environ['SLURM_NTASKS']} tasks but this process "
            "is not in an srun job step (SLURM_STEP_NUM_TASKS is unset), so its peers would never join: start every "
            "task with `srun saejax ...`, or set SAEJAX_DISTRIBUTED=off to run a single process"
        )
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    missing = [name for name, ok in (("SLURM_PROCID", environ.get("SLURM_PROCID")),
                                     ("SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST)", nodelist)) if not ok]
    if missing:
        raise ConfigError(
            f"SLURM job step with {environ['SLURM_STEP_NUM_TASKS']} tasks but {' and '.join(missing)} unset: "
            "cannot tell which process this is or where process 0 runs. Start the tasks with srun, or set "
            "SAEJAX_COORDINATOR_ADDRESS, SAEJAX_NUM_PROCESSES and SAEJAX_PROCESS_ID explicitly"
        )
    num = _int(environ, "SLURM_STEP_NUM_TASKS", minimum=1)
    pid = _int(environ, "SLURM_PROCID")
    if pid >= num:
        raise ConfigError(f"SLURM_PROCID={pid} must be below SLURM_STEP_NUM_TASKS={num}")
    if environ.get("JAX_COORDINATOR_PORT"):
        port = _int(environ, "JAX_COORDINATOR_PORT", minimum=1)
    else:
        port = _int(environ, "SLURM_JOB_ID") % _SLURM_PORT_RANGE + _SLURM_PORT_BASE
    local_ids = _device_ids(environ)
    nodes = next((_int(environ, name, minimum=1) for name in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
                  if environ.get(name)), None)
    if local_ids is None and nodes and num > nodes and environ.get("SLURM_LOCALID"):
        local_ids = [_int(environ, "SLURM_LOCALID")]  # several tasks per node: one GPU each, as JAX does
    return {"source": "SLURM", "coordinator": f"{first_host(nodelist)}:{port}",
            "num_processes": num, "process_id": pid, "local_device_ids": local_ids}


def _tpu(environ: Mapping[str, str]) -> bool:
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def detect(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """What `initialize_from_env` would do in `environ`: None (one process) or a description."""
    mode = environ.get(MODE, "").strip().lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode == "jax":
        return {"source": f"{MODE}=jax (JAX's cluster detection)", "auto": True}
    if mode not in ("", "auto"):
        raise ConfigError(f"{MODE}={environ[MODE]!r}: use auto (the default: detect from the environment), "
                          "off (a single process) or jax (JAX's own cluster detection, e.g. on a TPU VM)")
    found = _explicit(environ) or _slurm(environ)
    if found is None and _tpu(environ):
        found = {"source": "TPU VM (TPU_WORKER_HOSTNAMES / MEGASCALE_*)", "auto": True}
    return found


def initialize_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Call `jax.distributed.initialize` as the environment says; None if this is a single-process run.

    Returns {source, coordinator, num_processes, process_id} (and local_device_ids
    where set). Must run before anything touches a JAX backend.
    """
    import jax

    found = detect(os.environ if environ is None else environ)
    if found is None:
        return None
    if jax.distributed.is_initialized():  # e.g. a sweep point run inside an already joined process
        return {"source": "already initialized", "coordinator": None,
                "num_processes": jax.process_count(), "process_id": jax.process_index()}
    # Cross-process collectives on CPU need a transport; gloo ships with jaxlib. (Only the CPU
    # client reads this option, so it is harmless on GPU/TPU hosts.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if found.pop("auto", False):
            jax.distributed.initialize()
            # What JAX chose, read without jax.process_count(), which would start the backend.
            from jax._src.distributed import global_state

            found.update(coordinator=global_state.coordinator_address, num_processes=global_state.num_processes,
                         process_id=global_state.process_id)
        else:
            # "deactivate": the arguments are complete; stop JAX's SLURM detection from
            # overriding local_device_ids inside a SLURM allocation.
            jax.distributed.initialize(found["coordinator"], found["num_processes"], found["process_id"],
                                       local_device_ids=found["local_device_ids"],
                                       cluster_detection_method="deactivate")
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"could not join the distributed job ({found['source']}): {e}") from None
    if found.get("local_device_ids") is None:
        found.pop("local_device_ids", None)
    if found["process_id"] == 0:
        where = f"{found['source']}={found['coordinator']}" if found["source"] == EXPLICIT[0] else \
            f"{found['source']}, coordinator {found['coordinator']}"
        print(f"distributed: process 0 of {found['num_processes']} via {where}", file=sys.stderr, flush=True)
    return found

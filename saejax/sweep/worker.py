"""Train the runs of one sweep job: `python -m saejax.sweep.worker RUN_DIR [RUN_DIR ...]`.

Each RUN_DIR holds the config.json the runner wrote. Several directories are
trained in one pass over the data (saejax.trainer.train_group). Every run
that fails gets a failure.json with its error; the others go on. The worker
holds a lock on each run directory, so a second runner (a restart while the
old worker is still saving) waits instead of training the same run twice,
and it asks Linux for SIGTERM when its runner dies, so a killed runner's
workers save a checkpoint and exit instead of training on unseen.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import traceback
from typing import Iterator, Sequence

from saejax.config import config_from_dict
from saejax.errors import ConfigError, SaeJaxError
from saejax.preemption import Preempted
from saejax.sweep.table import RUN_CONFIG_FILE, clear_failure, record_failure
from saejax.workdir import WorkdirLock

EXIT_BUG = 1
PR_SET_PDEATHSIG = 1


def terminate_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux prctl); a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def load_run_config(run_dir: str):
    path = os.path.join(run_dir, RUN_CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir} has no {RUN_CONFIG_FILE}; it is not a sweep run directory")
    with open(path) as f:
        return config_from_dict(json.load(f))


@contextlib.contextmanager
def run_locks(run_dirs: Sequence[str], log=print) -> Iterator[None]:
    """Hold each run directory's lock (the one `saejax train` takes), waiting for a holder to stop."""
    locks = []
    try:
        for run_dir in run_dirs:
            os.makedirs(run_dir, exist_ok=True)
            locks.append(WorkdirLock(run_dir))
            locks[-1].acquire(wait=True, log=log)
        yield
    finally:
        for lock in locks:
            lock.release()


def train_runs(run_dirs: Sequence[str], configs, write_failures: bool = True) -> int:
    """Train the runs together; record each outcome; return the job's exit code (0: all finished)."""
    from saejax.trainer import train_group

    def record(indices, error: BaseException, exit_code: int) -> None:
        if write_failures:
            text = str(error) if isinstance(error, SaeJaxError) else "".join(
                traceback.format_exception(type(error), error, error.__traceback__)[-6:])
            for i in indices:
                record_failure(run_dirs[i], text, type(error).__name__, exit_code)

    try:
        outcomes = train_group(list(configs), list(run_dirs), raise_errors=False)
    except Preempted as e:
        print(f"saejax sweep: {e}", file=sys.stderr)
        for i, outcome in enumerate(getattr(e, "outcomes", [])):
            if isinstance(outcome, SaeJaxError):
                record([i], outcome, outcome.exit_code)
        return e.exit_code
    except SaeJaxError as e:  # shared by the whole job: its mesh, its data stream
        print(f"saejax sweep: error: {e}", file=sys.stderr)
        record(range(len(run_dirs)), e, e.exit_code)
        return e.exit_code
    except Exception as e:  # a bug: keep the traceback in failure.json, let the other jobs go on
        traceback.print_exc()
        record(range(len(run_dirs)), e, EXIT_BUG)
        return EXIT_BUG
    code = 0
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            exit_code = getattr(outcome, "exit_code", EXIT_BUG)
            record([i], outcome, exit_code)
            code = code or exit_code
        elif write_failures:
            clear_failure(run_dirs[i])
    return code


def main(argv: Sequence[str] | None = None) -> int:
    run_dirs = list(sys.argv[1:] if argv is None else argv)
    if not run_dirs:
        print("usage: python -m saejax.sweep.worker RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    terminate_with_parent()
    try:
        configs = [load_run_config(run_dir) for run_dir in run_dirs]
    except SaeJaxError as e:
        print(f"saejax sweep: error: {e}", file=sys.stderr)
        return e.exit_code
    with run_locks(run_dirs):
        return train_runs(run_dirs, configs)


if __name__ == "__main__":
    sys.exit(main())

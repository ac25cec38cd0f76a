"""The run directory: checked before anything is compiled, and held by one process at a time.

`hold_workdir(path)` (used by `train_and_evaluate`) checks that `--workdir`
is, or can be created as, a writable directory, then takes an exclusive lock
on `<workdir>/.lock` for the life of the run: a second `saejax train` on the
same workdir exits at once with a message naming the holder's PID and host.
The lock is `flock(2)`: the kernel drops it when its holder dies, however it
dies, so a lock file left by a killed process is simply taken over (its PID
and host are rewritten). On NFS Linux implements flock with POSIX locks,
which the server arbitrates across hosts. In a multi-process job process 0
checks and holds the workdir; the outcome is agreed with the others.
Sweep workers hold the same lock on their run directories (waiting instead
of exiting), so a `saejax train` on a sweep run is refused too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Callable, Iterator

from saejax.errors import ConfigError, SaeJaxError, WorkdirBusyError

LOCK_FILE = ".lock"
# Files written as PATH.tmp then renamed: a .tmp left here was interrupted and is never read.
LEFTOVERS = ("sae.safetensors.tmp", "cfg.json.tmp", "results.json.tmp", "metrics.jsonl.tmp")


def check_workdir(path: str) -> str:
    """Create `path` if needed and check it is a writable directory; returns its absolute path."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir {path} is a file, not a directory; pass a directory (created if absent)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {path} cannot be created ({e.strerror}: {e.filename}); "
                          "pass a path whose parents are directories you can write to") from None
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {path} is not writable ({e.strerror}); "
                          "pass a directory on a writable filesystem") from None
    return path


def _holder(handle) -> str:
    """'PID 123 on host h since ...' from the lock file (the holder writes it right after locking)."""
    for _ in range(20):
        handle.seek(0)
        try:
            info = json.loads(handle.read() or "null")
        except json.JSONDecodeError:
            info = None
        if info:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
            return f"PID {info.get('pid')} on host {info.get('host')} (since {since})"
        time.sleep(0.05)
    return "a process that has not written its PID yet"


class WorkdirLock:
    """An exclusive flock on DIR/.lock recording the holder's PID and host."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.handle = None

    def acquire(self, wait: bool = False, log: Callable[[str], None] = print) -> None:
        try:
            handle = open(self.path, "a+")
        except OSError as e:
            raise ConfigError(f"cannot create the lock file {self.path} ({e.strerror}); "
                              "pass a --workdir you can write to") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            if not wait:
                handle.close()
                raise WorkdirBusyError(
                    f"{self.directory} is in use: {holder} is training in it. Wait for it to finish or "
                    f"stop it (it resumes from its checkpoints), or use another --workdir") from None
            log(f"{self.directory} is being trained by {holder}; waiting for it to stop")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None


def remove_leftovers(directory: str) -> None:
    """Delete PATH.tmp files of writes a killed or failed run did not finish (done under the lock)."""
    for name in LEFTOVERS:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))


@contextlib.contextmanager
def hold_workdir(path: str) -> Iterator[str]:
    """Check and lock `path` for the life of the block (process 0 of a multi-process job; agreed by all)."""
    import jax

    from saejax.peers import agree

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            path = check_workdir(path)
            lock = WorkdirLock(path)
            lock.acquire()
            remove_leftovers(path)
        except SaeJaxError as e:
            error = e
    try:
        agree(error)
        yield os.path.abspath(os.path.expanduser(path))
    finally:
        if lock is not None:
            lock.release()

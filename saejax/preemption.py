"""SIGTERM/SIGINT: finish the step, save, wait for the save, exit for requeue.

Cluster schedulers (SLURM, TPU maintenance) send SIGTERM before killing a
job. The guard only records the request; the training loop acts on it
between steps. A second SIGINT interrupts at once (Ctrl-C twice).
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

from saejax.errors import EXIT_REQUEUE, SaeJaxError


class Preempted(SaeJaxError):
    """Raised after the state was saved; the CLI exits with EXIT_REQUEUE."""

    exit_code = EXIT_REQUEUE


class PreemptionGuard:
    def __init__(self):
        self._requested = threading.Event()
        self.signal_name = ""
        self._signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self._requested.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._signum = int(signum)
        self._requested.set()

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, failure: SaeJaxError | None = None) -> bool:
        """True on every process if any process was signalled (agreed across hosts).

        In a multi-process job every process must call this at the same steps: it
        is a collective. A process that was not signalled itself names the
        signal and the process that got it (`SIGTERM on process 3`). `failure`,
        this process's error at this step (its rows held NaN), is agreed in the
        same collective: every process raises the first one.
        """
        local = self._requested.is_set()
        if jax.process_count() == 1:
            if failure is not None:
                raise failure
            return local
        from jax.experimental import multihost_utils

        from saejax.peers import raise_agreed

        mine = [self._signum if local else 0, failure is not None]
        gathered = np.asarray(multihost_utils.process_allgather(np.array(mine, np.int32))).reshape(-1, 2)
        raise_agreed(failure, gathered[:, 1])
        received = gathered[:, 0]
        if not received.any():
            return False
        if not local:
            first = int(np.flatnonzero(received)[0])
            self.signal_name = f"{signal.Signals(int(received[first])).name} on process {first}"
        return True

"""The processes of a multi-process job stop together: agreed errors, and a watchdog for dead peers.

`agree(error)` is a collective: if any process passes an error, every
process raises the same one (same class, exit code and message, prefixed
with the process it came from). The trainer calls it once per step inside
the preemption check it already makes (`PreemptionGuard.requested`), so a
data error or NaN in one process's rows costs no extra collective; one
process (`jax.process_count() == 1`) makes none at all.

`PeerWatchdog` covers what a collective cannot: a peer that died (SIGKILL,
lost host) leaves the others blocked inside the train step's collectives.
Each process's watchdog threads publish a heartbeat through JAX's
coordination service and read the others'; a peer silent for
`SAEJAX_PEER_TIMEOUT_S` seconds (default 60, below JAX's own 100 s heartbeat
abort), or an unreachable coordinator, ends this process with one line and
EXIT_PEER_LOST. A peer that failed with a saejax error outside a collective
(its export, its save) posts that error; the others stop with it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from typing import Any

import numpy as np

from saejax.errors import EXIT_PEER_LOST, ConfigError, SaeJaxError

MESSAGE_BYTES = 4096
TIMEOUT_ENV = "SAEJAX_PEER_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
# After a peer posts its error, give this process's own (agreed) error path a moment to end it cleanly.
FAILURE_GRACE_S = 3.0


def _error_classes() -> dict[str, type]:
    found, todo = {}, [SaeJaxError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _encode(error: BaseException) -> str:
    code = getattr(error, "exit_code", 1)
    return f"{type(error).__name__}\0{code}\0{error}"


def _decode(text: str, process: int) -> SaeJaxError:
    name, code, message = (text.split("\0", 2) + ["", ""])[:3]
    cls = _error_classes().get(name, SaeJaxError)
    if cls.__init__ is not SaeJaxError.__init__:
        cls = SaeJaxError
    agreed = re.match(r"process \d+: ", message)  # already named its process when it was agreed
    error = cls(message if agreed else f"process {process}: {message}")
    error.exit_code = int(code) if code.lstrip("-").isdigit() else 1
    return error


def agree(error: SaeJaxError | None) -> None:
    """Raise on every process the first process's error, if any process has one (a collective)."""
    import jax

    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.array([error is not None], np.int32))).reshape(-1)
    raise_agreed(error, failed)


def raise_agreed(error: SaeJaxError | None, failed: np.ndarray) -> None:
    """Given every process's failed flag (already gathered), raise the first failure's error everywhere."""
    from jax.experimental import multihost_utils

    if not failed.any():
        return
    raw = np.zeros(MESSAGE_BYTES, np.uint8)
    if error is not None:
        encoded = _encode(error).encode()[:MESSAGE_BYTES]
        raw[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    messages = np.asarray(multihost_utils.process_allgather(raw)).reshape(len(failed), MESSAGE_BYTES)
    first = int(np.flatnonzero(failed)[0])
    raise _decode(messages[first].tobytes().rstrip(b"\0").decode(errors="replace"), first) from None


def peer_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds, e.g. 60") from None
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} must be positive")
    return seconds


def _stop(message: str, code: int) -> None:
    """End this process now: the main thread may be blocked in a collective that will never finish."""
    print(f"saejax train: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


class PeerWatchdog:
    """Heartbeats through the coordination service; ends this process if a peer dies or fails."""

    _generation = 0  # one key space per watched block; every process opens them in the same order

    def __init__(self, timeout_s: float | None = None):
        import jax

        self.timeout = peer_timeout() if timeout_s is None else float(timeout_s)
        self.me, self.count = jax.process_index(), jax.process_count()
        self.enabled = self.count > 1
        PeerWatchdog._generation += 1
        self.prefix = f"saejax/peers/{PeerWatchdog._generation}"
        self.interval = min(1.0, self.timeout / 10)
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self):
        from jax._src.distributed import global_state

        return global_state.client

    def __enter__(self) -> "PeerWatchdog":
        if not self.enabled:
            return self
        now = time.monotonic()
        self.last_change = {p: now for p in range(self.count) if p != self.me}
        self.last_beat: dict[int, str] = {}
        self.last_contact = now
        self.peer_failure: tuple[float, SaeJaxError] | None = None
        for target in (self._beat, self._watch):
            thread = threading.Thread(target=target, daemon=True, name=f"saejax-{target.__name__[1:]}")
            thread.start()
            self._threads.append(thread)
        return self

    def _entries(self, client) -> dict[str, str]:
        return dict(client.key_value_dir_get(self.prefix + "/"))

    def _beat(self) -> None:
        client, counter = self._client(), 0
        while not self._stopped.is_set():
            counter += 1
            try:
                client.key_value_set(f"{self.prefix}/alive/{self.me}", str(counter), allow_overwrite=True)
                entries = self._entries(client)
            except Exception:  # the coordinator (process 0) is gone; _watch reports it when the bound passes
                self._stopped.wait(self.interval)
                continue
            now = time.monotonic()
            self.last_contact = now
            for peer in self.last_change:
                beat = entries.get(f"{self.prefix}/alive/{peer}")
                if f"{self.prefix}/done/{peer}" in entries:
                    self.last_change[peer] = float("inf")  # finished: silence is expected
                elif beat is not None and beat != self.last_beat.get(peer):
                    self.last_beat[peer], self.last_change[peer] = beat, now
                failure = entries.get(f"{self.prefix}/failed/{peer}")
                if failure is not None and self.peer_failure is None:
                    self.peer_failure = (now, _decode(failure, peer))
            self._stopped.wait(self.interval)

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval / 2):
            now = time.monotonic()
            if self.peer_failure is not None and now - self.peer_failure[0] > FAILURE_GRACE_S:
                error = self.peer_failure[1]
                _stop(str(error), error.exit_code)
            if now - self.last_contact > self.timeout and self.me != 0:
                _stop(f"lost contact with process 0 (the job's coordinator) for {self.timeout:.0f} s: it was killed, "
                      "crashed or its host is down. The last complete checkpoint is intact; restart the whole "
                      f"job to resume ({TIMEOUT_ENV} sets this wait)", EXIT_PEER_LOST)
            silent = [p for p, t in self.last_change.items() if now - t > self.timeout]
            if silent:
                _stop(f"process {silent[0]} of {self.count} has not answered for {self.timeout:.0f} s: it was "
                      "killed, crashed or its host is down. The last complete checkpoint is intact; restart the "
                      f"whole job to resume ({TIMEOUT_ENV} sets this wait)", EXIT_PEER_LOST)

    def __exit__(self, kind, error, tb) -> None:
        if not self.enabled:
            return
        if error is not None and not isinstance(error, SaeJaxError):
            # A collective broken by a dead peer raises here first: let the watchdog name the peer.
            deadline = time.monotonic() + self.timeout + 2 * self.interval + 1
            while time.monotonic() < deadline:
                time.sleep(self.interval / 2)
        client = self._client()
        try:
            if error is None:
                client.key_value_set(f"{self.prefix}/done/{self.me}", "1", allow_overwrite=True)
            else:
                client.key_value_set(f"{self.prefix}/failed/{self.me}", _encode(error), allow_overwrite=True)
                self._wait_for_peers(client)
        except Exception:  # the coordinator is gone; the peers' watchdogs report that
            pass
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.interval + 1)

    def _wait_for_peers(self, client) -> None:
        """After a failure, let every peer finish or read it before this process (maybe the coordinator) exits."""
        deadline = time.monotonic() + FAILURE_GRACE_S + 2 * self.interval + 2
        while time.monotonic() < deadline:
            entries: dict[str, Any] = self._entries(client)
            if all(f"{self.prefix}/done/{p}" in entries or f"{self.prefix}/failed/{p}" in entries
                   for p in self.last_change):
                return
            time.sleep(self.interval / 2)

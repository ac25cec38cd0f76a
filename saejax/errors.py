"""Errors a user can act on, and the exit codes the CLI maps them to."""

EXIT_OK = 0
EXIT_USAGE = 2  # bad config, bad data, bad arguments: fix the input and run again
EXIT_DIVERGED = 3  # NaN/inf in training: the last good checkpoint is intact
EXIT_OVER_BUDGET = 4  # the plan does not fit the per-device memory budget
EXIT_IO = 5  # writing a checkpoint, metrics, results or the export failed (full disk, I/O error)
EXIT_BUSY = 6  # another saejax process is training in this workdir
EXIT_PEER_LOST = 7  # a process of a multi-process job died or stopped answering
# Preempted (SIGTERM/SIGINT): state saved; a cluster script should requeue the job.
# 75 is EX_TEMPFAIL from sysexits.h ("temporary failure, try again").
EXIT_REQUEUE = 75


class SaeJaxError(Exception):
    """Base class: the message says what was wrong and what to do."""

    exit_code = 1


class ConfigError(SaeJaxError):
    exit_code = EXIT_USAGE


class DataError(SaeJaxError):
    exit_code = EXIT_USAGE


class TrainingDivergedError(SaeJaxError):
    exit_code = EXIT_DIVERGED


class OverBudgetError(SaeJaxError):
    exit_code = EXIT_OVER_BUDGET


class WorkdirIOError(SaeJaxError):
    exit_code = EXIT_IO


class WorkdirBusyError(SaeJaxError):
    exit_code = EXIT_BUSY


class PeerLostError(SaeJaxError):
    exit_code = EXIT_PEER_LOST


def os_reason(error: BaseException) -> str:
    """The OSError behind `error` (orbax and asyncio wrap it), as '[Errno 28] No space left on device'."""
    import os
    import re

    seen, first = set(), error
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return f"[Errno {error.errno}] {error.strerror}"
        code = re.search(r"os_error_code='(\d+)'", str(error))  # tensorstore's ValueError for an OS error
        if code:
            return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
        error = error.__cause__ or error.__context__
    return str(first).splitlines()[0] if first is not None and str(first) else "unknown error"


def write_failed(what: str, path: str, error: BaseException, advice: str) -> WorkdirIOError:
    """One line for a failed write: what, where, why, and what to do."""
    return WorkdirIOError(f"writing {what + ' ' if what else ''}{path} failed ({os_reason(error)}). {advice}")

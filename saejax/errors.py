"""Errors a user can act on, and the exit codes the CLI maps them to."""

EXIT_OK = 0
EXIT_USAGE = 2  # bad config, bad data, bad arguments: fix the input and run again
EXIT_DIVERGED = 3  # NaN/inf in training: the last good checkpoint is intact
EXIT_OVER_BUDGET = 4  # the plan does not fit the per-device memory budget
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

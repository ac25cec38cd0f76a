"""Checkpoints with orbax: sharded, async, atomic, restorable onto another mesh.

Layout: <workdir>/checkpoints/<step>/{state,meta}. Each device writes its
own shards. orbax writes a step into a temporary directory and renames it
when complete, so a checkpoint interrupted mid-write is never listed (and its
leftovers are removed on the next start). Restore takes an abstract state
whose ShapeDtypeStructs carry the *current* mesh's shardings, so a run saved
on a 1x8 mesh resumes on 2x4 (or one device).

A save that fails (a full disk) is a WorkdirIOError naming the step and the
last complete checkpoint; `check()` finds an asynchronous save's failure
while training goes on, so the run stops at the step where it happened.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from saejax.errors import ConfigError, write_failed


class _QuietOSErrors(logging.Filter):
    """Drop orbax's multi-page log of an OS error in its save threads: Checkpointer reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        return "os_error_code=" not in text and "[Errno" not in text


logging.getLogger("absl").addFilter(_QuietOSErrors())
_default_unraisable = sys.unraisablehook


def _quiet_closed_loop(unraisable) -> None:
    """After a failed save, tensorstore's late callbacks hit orbax's closed event loop: nothing to report."""
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
        return
    _default_unraisable(unraisable)


sys.unraisablehook = _quiet_closed_loop


class Checkpointer:
    def __init__(self, directory: str, keep_last: int = 3, keep_every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        policies = [preservation.LatestN(keep_last)]
        if keep_every:
            policies.append(preservation.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            save_decision_policy=None,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self.saving: int | None = None  # the step of the save that may still be in flight
        self.failure = None  # the error of a failed save, raised again by later calls

    @classmethod
    def from_config(cls, workdir: str, config) -> "Checkpointer":
        c = config.checkpoint
        return cls(os.path.join(workdir, "checkpoints"), c.keep_last, c.keep_every, c.async_save)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving (device->host copies finish before this returns; writing continues async)."""
        self.wait()  # orbax waits for the previous save anyway; a failure of it is named as its own step
        self.saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:
            raise self._failed(e) from None

    def _failed(self, error: BaseException):
        if self.failure is not None:
            return self.failure
        step = self.saving
        complete = [int(name) for name in os.listdir(self.directory) if name.isdigit() and int(name) != step] \
            if os.path.isdir(self.directory) else []
        intact = f"the last complete one, step {max(complete)}, is intact" if complete else "no earlier one exists"
        self.failure = write_failed(f"checkpoint step {step} to", self.directory, error,
                                    f"Training stopped; {intact}. Free space there (or move the workdir) "
                                    "and run the same command to resume.")
        return self.failure

    def check(self) -> None:
        """Raise if the last asynchronous save failed; cheap (no wait), so called every step."""
        if self.failure is not None:
            raise self.failure
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failed(e) from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore onto the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError) as e:
            raise ConfigError(
                f"checkpoint {self.directory}/{step} does not match this config's state ({e}). "
                "It was written by a different configuration; use a fresh --workdir."
            ) from None
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from None
        self.saving = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._close_manager()
            except Exception:
                if self.failure is None:  # after a failed save, orbax may fail again on close
                    raise

    def _close_manager(self) -> None:
        # Orbax removes leftovers of interrupted saves on a background future that
        # close() does not await; without this a short run can exit before they
        # are gone. (Private in orbax 0.12; skipped if a later version drops it.)
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete state."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)

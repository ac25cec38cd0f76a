"""The data-source interface the trainer reads from.

Batch `step` of a split is a pure function of (seed, split, step): resuming at
step s needs no iterator state, and every process can compute which rows it
feeds. The synthetic generator, the .npy reader and the tensorstore
activation store (`saejax.data.store`) all implement this.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from saejax.errors import DataError

SPLITS = ("train", "eval")


class DataSource(abc.ABC):
    """Activations of dimension `d`, read as float32 batches."""

    d: int

    @abc.abstractmethod
    def rows(self, step: int, batch_size: int, split: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of global batch `step` of `split`, float32 (stop - start, d)."""

    @abc.abstractmethod
    def sample(self, num_rows: int) -> np.ndarray:
        """A fixed sample of training rows (initialisation, scale estimate); float32 (num_rows, d)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming the source, for messages."""

    def metadata(self) -> dict[str, Any]:
        """Facts recorded with checkpoints and results."""
        return {"source": self.describe(), "d": self.d}

    def split_rows(self) -> dict[str, int] | None:
        """Rows in each split ({"train": .., "eval": ..}); None for an endless source."""
        return None

    def stored_scale(self) -> float | None:
        """A normalisation scale computed over the whole dataset, if the source has one."""
        return None

    @staticmethod
    def process_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
        """The contiguous rows [start, stop) of a global batch that process `process_index` feeds."""
        if batch_size % process_count:
            raise DataError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        per_process = batch_size // process_count
        return process_index * per_process, (process_index + 1) * per_process

    def read(self, step: int, batch_size: int, split: str = "train", process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """This process's contiguous share of global batch `step` (its rows of the data axis)."""
        return self.read_async(step, batch_size, split, process_index, process_count).result()

    def read_async(self, step: int, batch_size: int, split: str = "train", process_index: int = 0,
                   process_count: int = 1) -> "PendingRows":
        """Start reading this process's share of batch `step`; `.result()` returns it.

        Sources with asynchronous I/O override this to put reads in flight at once.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        start, stop = self.process_rows(batch_size, process_index, process_count)
        return _ReadyRows(self.rows(step, batch_size, split, start, stop))


class PendingRows(abc.ABC):
    """Rows being read; `result()` waits for them."""

    @abc.abstractmethod
    def result(self) -> np.ndarray: ...


class _ReadyRows(PendingRows):
    def __init__(self, rows: np.ndarray):
        self._rows = rows

    def result(self) -> np.ndarray:
        return self._rows


def check_finite(batch: np.ndarray, step: int, split: str, source: DataSource, what: str = "") -> None:
    """Raise a DataError naming the step (or `what`) and row if a batch holds NaN or inf."""
    finite = np.isfinite(batch)
    if finite.all():
        return
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    raise DataError(
        f"{what or f'{split} batch for step {step}'} from {source.describe()} contains NaN/inf in "
        f"{bad_rows.size} row(s) (first at row {bad_rows[0]} of {'the sample' if what else 'the batch'}). "
        "The data is corrupt; "
        "fix or regenerate it. Nothing was trained on this batch and existing checkpoints are intact."
    )

"""From a data source to device batches: normalisation, checks, prefetch."""

from __future__ import annotations

import collections
import queue
import threading

import jax
import numpy as np

from saejax.data.source import DataSource, PendingRows, check_finite
from saejax.errors import DataError


def estimate_scale(sample: np.ndarray) -> float:
    """Scale s with E||s x||^2 = d on the sample (the common SAE normalisation)."""
    mean_sq_norm = float(np.mean(np.sum(np.square(sample, dtype=np.float64), axis=1)))
    if not np.isfinite(mean_sq_norm) or mean_sq_norm <= 0:
        raise DataError(f"cannot normalise: the data sample's mean squared norm is {mean_sq_norm}")
    return float(np.sqrt(sample.shape[1] / mean_sq_norm))


def process_share(sharding, batch_size: int) -> tuple[int, int]:
    """(index, count): this process feeds rows [index, index + 1) * batch_size / count of each global batch.

    The share follows the batch's sharding, not the process index: a process
    must supply every row its own devices hold. With the latent axis spanning
    processes (mesh data=1, model over all devices) every process holds, and
    reads, the whole batch; with the data axis split over processes each reads
    its block. None of the sources need more than a contiguous block per process.
    """
    if sharding is None or jax.process_count() == 1:
        return 0, 1
    rows = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                   for index in sharding.addressable_devices_indices_map((batch_size, 1)).values()})
    start, stop = rows[0][0], rows[-1][1]
    per = stop - start
    contiguous = all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    if not contiguous or batch_size % per or start % per:
        raise DataError(
            f"process {jax.process_index()}'s devices hold rows {rows} of the {batch_size}-token batch, not one "
            "aligned contiguous block; order the mesh so each process's devices hold adjacent data-axis positions"
        )
    return start // per, batch_size // per


def start_host_batch(source: DataSource, step: int, batch_size: int, split: str = "train", sharding=None) -> PendingRows:
    """Put the reads for this process's rows of batch `step` (those `sharding` puts on its devices) in flight."""
    index, count = process_share(sharding, batch_size) if sharding is not None else (jax.process_index(), jax.process_count())
    return source.read_async(step, batch_size, split, index, count)


def finish_host_batch(pending: PendingRows, source: DataSource, step: int, scale: float, split: str = "train") -> np.ndarray:
    """Wait for the rows, check them for NaN/inf and normalise them."""
    local = pending.result()
    check_finite(local, step, split, source)
    return local * np.float32(scale) if scale != 1.0 else local


def host_batch(source: DataSource, step: int, batch_size: int, scale: float, split: str = "train",
               sharding=None) -> np.ndarray:
    """This process's rows of batch `step`, checked for NaN/inf and normalised.

    Pass the batch's `sharding` in multi-process runs: without it each process
    reads a 1/process_count share, right only when the data axis is split over processes.
    """
    pending = start_host_batch(source, step, batch_size, split, sharding)
    return finish_host_batch(pending, source, step, scale, split)


def device_batch(local: np.ndarray, batch_size: int, sharding) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, (batch_size, local.shape[1]))


class BatchFeeder:
    """Reads and places batches for consecutive steps on a background thread.

    The batch for step s depends only on s, so the feeder can start anywhere
    (resume) and run ahead of the train step: `prefetch` batches wait on the
    device, and the reads of the next `prefetch` batches are in flight.
    """

    def __init__(self, source: DataSource, batch_size: int, sharding, scale: float,
                 start_step: int, stop_step: int, prefetch: int, split: str = "train"):
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        args = (source, batch_size, sharding, scale, start_step, stop_step, split)
        self._thread = threading.Thread(target=self._work, args=args, daemon=True, name="saejax-feeder")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, source, batch_size, sharding, scale, start_step, stop_step, split):
        try:
            in_flight: collections.deque = collections.deque()
            next_read = start_step
            for step in range(start_step, stop_step):
                while next_read < stop_step and len(in_flight) <= self._queue.maxsize:
                    in_flight.append(start_host_batch(source, next_read, batch_size, split, sharding))
                    next_read += 1
                local = finish_host_batch(in_flight.popleft(), source, step, scale, split)
                if not self._put((step, device_batch(local, batch_size, sharding))):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((None, e))

    def get(self, step: int) -> jax.Array:
        """The batch for `step`; steps must be asked for in order."""
        if self._error is not None:
            raise self._error
        got, item = self._queue.get()
        if got is None:
            self._error = item
            raise item
        if got != step:
            raise RuntimeError(f"feeder out of order: asked for step {step}, had step {got}")
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

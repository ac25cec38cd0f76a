"""Activations from a single .npy file of shape (tokens, d), memory-mapped.

A fixed permutation (from the seed) sets `eval_fraction` of the rows aside
for evaluation. Training walks the remaining rows in a fresh seeded
permutation each epoch; the rows of batch `step` are computed from
(seed, step) alone.
"""

from __future__ import annotations

import os

import numpy as np

from saejax.data.source import DataSource
from saejax.errors import DataError


class NpySource(DataSource):
    def __init__(self, path: str, d: int, seed: int, eval_fraction: float):
        self.path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(self.path):
            raise DataError(f"data.path {self.path!r} does not exist; point data.path at a .npy file of shape (tokens, d)")
        try:
            self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{self.path} is not a readable .npy array ({e}); write it with numpy.save") from None
        if self.array.ndim != 2:
            raise DataError(f"{self.path} has shape {self.array.shape}; expected 2-D (tokens, d)")
        if not np.issubdtype(self.array.dtype, np.floating):
            raise DataError(f"{self.path} has dtype {self.array.dtype}; expected floating point activations")
        if self.array.shape[1] == 0:
            raise DataError(f"{self.path} has shape {self.array.shape}: its rows are empty (d=0); "
                            "write the activations as a (tokens, d) array with d > 0")
        if self.array.shape[1] != d:
            raise DataError(
                f"{self.path} holds vectors of dimension {self.array.shape[1]} but sae.d={d}; "
                f"set --config.sae.d={self.array.shape[1]} or use the matching activations"
            )
        self.d = int(d)
        self.seed = int(seed)
        num_rows = self.array.shape[0]
        num_eval = int(round(num_rows * eval_fraction))
        order = np.random.default_rng([self.seed, 0xE7A1]).permutation(num_rows)
        self.eval_rows = np.sort(order[:num_eval])
        self.train_rows = np.sort(order[num_eval:])
        self._epoch_cache: dict[int, np.ndarray] = {}
        if self.train_rows.size == 0:
            raise DataError(f"{self.path} has {num_rows} rows, none left for training after the eval split")

    @classmethod
    def from_config(cls, config) -> "NpySource":
        return cls(config.data.path, config.sae.d, config.seed, config.data.eval_fraction)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Training rows in epoch `epoch`'s order (the current and previous epochs are cached)."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.train_rows)
        return self._epoch_cache[epoch]

    def _gather(self, row_ids: np.ndarray) -> np.ndarray:
        order = np.argsort(row_ids, kind="stable")  # read in file order, return in batch order
        out = np.empty((row_ids.size, self.d), np.float32)
        out[order] = self.array[row_ids[order]]
        return out

    def row_ids(self, step: int, batch_size: int, split: str, start: int, stop: int) -> np.ndarray:
        """File row numbers of rows [start, stop) of global batch `step` of `split`."""
        positions = np.arange(step * batch_size + start, step * batch_size + stop, dtype=np.int64)
        if split == "eval":
            if self.eval_rows.size == 0:
                raise DataError("no evaluation rows: set data.eval_fraction > 0 or train.eval_batches=0")
            return self.eval_rows[positions % self.eval_rows.size]
        epochs, offsets = np.divmod(positions, self.train_rows.size)
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            ids[chosen] = self._epoch_order(int(epoch))[offsets[chosen]]
        return ids

    def rows(self, step, batch_size, split, start, stop):
        return self._gather(self.row_ids(step, batch_size, split, start, stop))

    def sample(self, num_rows):
        rng = np.random.default_rng([self.seed, 0x5A3])
        ids = rng.choice(self.train_rows, size=min(num_rows, self.train_rows.size), replace=False)
        return self._gather(ids)

    def split_rows(self):
        return {"train": int(self.train_rows.size), "eval": int(self.eval_rows.size)}

    def describe(self):
        return f"npy({self.path}, {self.array.shape[0]} rows x d={self.d})"

    def metadata(self):
        return {**super().metadata(), "path": self.path, "rows": int(self.array.shape[0]),
                "eval_rows": int(self.eval_rows.size)}

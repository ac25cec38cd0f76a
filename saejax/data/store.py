"""StoreSource: the data-source interface over a finished activation store
(layout in `saejax.store.layout`).

Order. Chunks (the store's ~1 MB read unit) are split once into train and
eval chunks by the store's own seed, so every run on a store holds out the
same tokens. Epoch e of training visits the train chunks in a permutation
seeded by (seed, e), each chunk's rows in a permutation seeded by
(seed, e, chunk). Batch i is rows [i*B, (i+1)*B) of that endless stream:
a pure function of (seed, i), and a process's share of it a pure function
of (seed, i, process index), so resume and multi-host need no state.

Reads. A batch is assembled from whole chunks read concurrently with
tensorstore's asynchronous reads; `read_async` starts them and returns at
once, so the feeder keeps several batches' reads in flight while the train
step runs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from saejax.data.source import SPLITS, DataSource, PendingRows
from saejax.errors import DataError
from saejax.store.layout import ACTIVATIONS, file_problem, open_arrays, read_ledger, shard_file, verify_files


class StoreSource(DataSource):
    def __init__(self, path: str, d: int, seed: int, eval_fraction: float):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.ledger = read_ledger(self.path)
        self.d = int(self.ledger["geometry"]["d"])
        if self.d != d:
            raise DataError(
                f"the store {self.path} holds activations of dimension d={self.d} "
                f"({self.ledger['identity']['model']['name']} at {self.ledger['identity']['hookpoint']}) but sae.d={d}; "
                f"set --config.sae.d={self.d} or point data.path at a store of dimension {d}"
            )
        verify_files(self.path, self.ledger)
        self.activations, self.tokens = open_arrays(self.path)
        self.num_tokens = int(self.ledger["num_tokens"])
        if tuple(self.activations.shape) != (self.num_tokens, self.d):
            raise DataError(f"{self.path}: the activation array has shape {tuple(self.activations.shape)} but the "
                            f"ledger records ({self.num_tokens}, {self.d}); the store is damaged: harvest it again")
        self.chunk_rows = int(self.ledger["geometry"]["chunk_rows"])
        self.shard_rows = int(self.ledger["geometry"]["shard_rows"])
        self.seed = int(seed)
        num_chunks = -(-self.num_tokens // self.chunk_rows)
        self.chunk_sizes = np.full(num_chunks, self.chunk_rows, np.int64)
        self.chunk_sizes[-1] = self.num_tokens - (num_chunks - 1) * self.chunk_rows
        num_eval = int(round(num_chunks * eval_fraction))
        if eval_fraction > 0 and num_eval == 0:
            num_eval = 1
        if num_eval >= num_chunks:
            raise DataError(
                f"{self.path} has {num_chunks} chunk(s) of {self.chunk_rows} tokens: too few to hold out "
                f"data.eval_fraction={eval_fraction} of them and still train. Harvest more tokens, or set "
                "--config.data.eval_fraction=0 --config.train.eval_batches=0"
            )
        split_order = np.random.default_rng([int(self.ledger["seed"]), 0xE7A1]).permutation(num_chunks)
        self.eval_chunks = np.sort(split_order[:num_eval])
        self.train_chunks = np.sort(split_order[num_eval:])
        self.train_tokens = int(self.chunk_sizes[self.train_chunks].sum())
        self.eval_tokens = int(self.chunk_sizes[self.eval_chunks].sum())
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_config(cls, config) -> "StoreSource":
        return cls(config.data.path, config.sae.d, config.seed, config.data.eval_fraction)

    # ----------------------------------------------------------------- order

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Train chunk ids in epoch order and the stream offset at which each starts."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            chunks = np.random.default_rng([self.seed, epoch]).permutation(self.train_chunks)
            starts = np.concatenate([[0], np.cumsum(self.chunk_sizes[chunks])[:-1]])
            self._epoch_cache[epoch] = (chunks, starts)
        return self._epoch_cache[epoch]

    def _row_order(self, epoch: int, chunk: int) -> np.ndarray:
        size = int(self.chunk_sizes[chunk])
        if epoch < 0:  # eval: chunks read in storage order
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, int(chunk)]).permutation(size)

    def locate(self, step: int, batch_size: int, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, chunk id, row within chunk) of rows [start, stop) of global batch `step`; epoch -1 for eval."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        positions = np.arange(step * batch_size + start, step * batch_size + stop, dtype=np.int64)
        if split == "eval":
            if self.eval_tokens == 0:
                raise DataError("this run holds out no evaluation chunks: set data.eval_fraction > 0 or train.eval_batches=0")
            offsets = positions % self.eval_tokens
            starts = np.concatenate([[0], np.cumsum(self.chunk_sizes[self.eval_chunks])[:-1]])
            slots = np.searchsorted(starts, offsets, side="right") - 1
            return np.full_like(positions, -1), self.eval_chunks[slots], offsets - starts[slots]
        epochs, offsets = np.divmod(positions, self.train_tokens)
        chunk_ids, within = np.empty_like(positions), np.empty_like(positions)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            chunks, starts = self._epoch(int(epoch))
            slots = np.searchsorted(starts, offsets[chosen], side="right") - 1
            chunk_ids[chosen] = chunks[slots]
            within[chosen] = offsets[chosen] - starts[slots]
        return epochs, chunk_ids, within

    # ----------------------------------------------------------------- reads

    def read_async(self, step, batch_size, split="train", process_index=0, process_count=1) -> PendingRows:
        start, stop = self.process_rows(batch_size, process_index, process_count)
        epochs, chunk_ids, within = self.locate(step, batch_size, split, start, stop)
        return _PendingStoreRows(self, self._start_reads(epochs, chunk_ids), epochs, chunk_ids, within)

    def rows(self, step, batch_size, split, start, stop):
        epochs, chunk_ids, within = self.locate(step, batch_size, split, start, stop)
        return self._assemble(self._start_reads(epochs, chunk_ids), epochs, chunk_ids, within)

    def _start_reads(self, epochs, chunk_ids) -> dict:
        reads = {}
        for epoch, chunk in set(zip(epochs.tolist(), chunk_ids.tolist(), strict=True)):
            first = chunk * self.chunk_rows
            reads[(epoch, chunk)] = self.activations[first:first + int(self.chunk_sizes[chunk])].read()
        return reads

    def _chunk(self, chunk: int, future) -> np.ndarray:
        """A chunk read's result; a checksum mismatch (DATA_LOSS) or a missing chunk (NOT_FOUND) names the shard."""
        try:
            return future.result()
        except ValueError as e:
            raise DataError(self._corrupt_message(chunk, e)) from None

    def _assemble(self, reads: dict, epochs, chunk_ids, within) -> np.ndarray:
        out = np.empty((len(within), self.d), np.float32)
        keys, group = np.unique(np.stack([epochs, chunk_ids], axis=1), axis=0, return_inverse=True)
        order = np.argsort(group.ravel(), kind="stable")
        bounds = np.searchsorted(group.ravel()[order], np.arange(len(keys) + 1))
        for g, (epoch, chunk) in enumerate(keys.tolist()):
            chosen = order[bounds[g]:bounds[g + 1]]
            data = self._chunk(chunk, reads[(epoch, chunk)])
            out[chosen] = data[self._row_order(epoch, chunk)[within[chosen]]]
        return out

    def _corrupt_message(self, chunk: int, error: Exception) -> str:
        shard = shard_file(self.path, chunk * self.chunk_rows, self.shard_rows, ACTIVATIONS)
        relative = os.path.relpath(shard, self.path)
        recorded = (self.ledger.get("files") or {}).get(relative)
        problem = file_problem(self.path, relative, recorded, self.ledger["geometry"]) or "is corrupt"
        return (f"activation store {self.path}: chunk {chunk} (rows {chunk * self.chunk_rows}-"
                f"{chunk * self.chunk_rows + int(self.chunk_sizes[chunk]) - 1}) in shard file {shard} {problem} "
                f"({error}). Nothing was trained on it. Restore that file from a backup or harvest the store again.")

    def sample(self, num_rows):
        """All rows of random train chunks (the store is shuffled at write time, so chunks are representative)."""
        order = np.random.default_rng([self.seed, 0x5A3]).permutation(self.train_chunks)
        sizes = np.cumsum(self.chunk_sizes[order])
        chosen = order[: int(np.searchsorted(sizes, min(num_rows, self.train_tokens))) + 1]
        epochs = np.full(len(chosen), -1)
        reads = self._start_reads(epochs, chosen)
        parts = [self._chunk(int(chunk), reads[(-1, int(chunk))]) for chunk in chosen]
        return np.concatenate(parts).astype(np.float32)[:num_rows]

    def split_rows(self):
        return {"train": self.train_tokens, "eval": self.eval_tokens}

    def stored_scale(self) -> float:
        return float(self.ledger["normalization"]["scale"])

    def describe(self):
        identity = self.ledger["identity"]
        return (f"store({self.path}: {identity['model']['name']} {identity['hookpoint']}, "
                f"{self.num_tokens:,} tokens x d={self.d})")

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "path": self.path, "num_tokens": self.num_tokens,
                "train_tokens": self.train_tokens, "eval_tokens": self.eval_tokens,
                "model": self.ledger["identity"]["model"], "hookpoint": self.ledger["identity"]["hookpoint"],
                "hookpoint_convention": self.ledger.get("hookpoint_convention"),
                "store_normalization": self.ledger["normalization"], "hashes": self.ledger.get("hashes")}


class _PendingStoreRows(PendingRows):
    def __init__(self, source: StoreSource, reads, epochs, chunk_ids, within):
        self.source, self.reads = source, reads
        self.epochs, self.chunk_ids, self.within = epochs, chunk_ids, within

    def result(self) -> np.ndarray:
        return self.source._assemble(self.reads, self.epochs, self.chunk_ids, self.within)

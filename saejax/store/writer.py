"""Writes activations into a store in shuffled, shard-aligned blocks; resumable.

Rows arrive in token order (batch after batch of contexts). They collect in
a buffer; each full block (a whole number of shards) is permuted with a
seeded permutation and written, so neighbouring tokens of a context end up
far apart. After each block, progress.json records the next batch and the
rows left over (carry-<batch>.npz). A harvest killed at any point and run
again redoes at most one block, from the same batch boundaries, and writes
byte-identical shards: no token is duplicated or lost.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from saejax.errors import DataError
from saejax.export import write_json_atomic
from saejax.store.layout import (
    FORMAT,
    LEDGER_FILE,
    METADATA_FILE,
    PROGRESS_FILE,
    Geometry,
    canonical_json,
    create_arrays,
    list_files,
    numpy_dtype,
    read_json,
)


class StoreWriter:
    """Appends rows to a new or partly written store; `finish()` writes the ledger."""

    def __init__(self, store: str, identity: dict[str, Any], geometry: Geometry, seed: int, block_shards: int):
        self.store = os.path.abspath(os.path.expanduser(store))
        self.geometry, self.seed = geometry, int(seed)
        self.block_rows = max(1, int(block_shards)) * geometry.shard_rows
        self.dtype = numpy_dtype(geometry.dtype)
        os.makedirs(self.store, exist_ok=True)
        metadata = {"format": FORMAT, "identity": identity, "geometry": geometry.as_dict(), "seed": self.seed,
                    "block_rows": self.block_rows}
        existing = read_json(os.path.join(self.store, METADATA_FILE))
        if existing is None:
            if os.listdir(self.store):
                raise DataError(f"{self.store} is not empty and is not an activation store; harvest into a new or empty directory")
            write_json_atomic(os.path.join(self.store, METADATA_FILE), metadata)
        elif canonical_json(existing) != canonical_json(metadata):
            raise DataError(
                f"{self.store} holds a harvest started with different arguments "
                f"({_differences(existing, metadata)}). Continue it with the original arguments, "
                "or harvest into a new --store path; nothing was changed."
            )
        self.activations, self.tokens = create_arrays(self.store, geometry)
        self._restore_progress()

    # ----------------------------------------------------------------- progress

    def _restore_progress(self) -> None:
        progress = read_json(os.path.join(self.store, PROGRESS_FILE))
        if progress is None:
            self.next_batch, self.rows_written, self.blocks_written = 0, 0, 0
            self.sum_sq = 0.0
            self.buffer_acts: list[np.ndarray] = []
            self.buffer_tokens: list[np.ndarray] = []
            return
        self.next_batch = int(progress["next_batch"])
        self.rows_written = int(progress["rows_written"])
        self.blocks_written = int(progress["blocks_written"])
        self.sum_sq = float(progress["sum_sq"])
        carry_path = os.path.join(self.store, progress["carry_file"])
        try:
            with np.load(carry_path) as carry:
                self.buffer_acts, self.buffer_tokens = [carry["activations"]], [carry["tokens"]]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{carry_path} is unreadable ({e}); the harvest's progress is damaged. "
                            "Harvest into a new --store path.") from None

    def _save_progress(self) -> None:
        carry_file = f"carry-{self.next_batch}.npz"
        tmp = os.path.join(self.store, carry_file + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, activations=self._buffered(self.buffer_acts, self.geometry.d, np.float32),
                     tokens=self._buffered(self.buffer_tokens, 3, np.int32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.store, carry_file))
        write_json_atomic(os.path.join(self.store, PROGRESS_FILE), {
            "next_batch": self.next_batch, "rows_written": self.rows_written, "blocks_written": self.blocks_written,
            "sum_sq": self.sum_sq, "carry_file": carry_file,
        })
        for name in os.listdir(self.store):  # carries of earlier blocks
            if name.startswith("carry-") and name != carry_file:
                os.remove(os.path.join(self.store, name))

    @staticmethod
    def _buffered(parts: list[np.ndarray], columns: int, dtype) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, columns), dtype)

    @property
    def buffered_rows(self) -> int:
        return sum(len(a) for a in self.buffer_acts)

    # ----------------------------------------------------------------- writing

    def add(self, batch_index: int, activations: np.ndarray, tokens: np.ndarray) -> None:
        """Rows of harvest batch `batch_index` (float32 (m, d), int32 (m, 3)), in token order."""
        if batch_index != self.next_batch:
            raise RuntimeError(f"store expects batch {self.next_batch}, got {batch_index}")
        if activations.shape[1:] != (self.geometry.d,) or tokens.shape != (len(activations), 3):
            raise RuntimeError(f"batch {batch_index}: activations {activations.shape} / tokens {tokens.shape} do not match d={self.geometry.d}")
        if not np.isfinite(activations).all():
            raise DataError(f"the model produced NaN/inf activations in harvest batch {batch_index}; "
                            "nothing from this block was written. Check the model's dtype (float32 is safest).")
        stored = activations.astype(self.dtype).astype(np.float32)  # what the reader will see
        self.sum_sq += float(np.sum(np.square(stored, dtype=np.float64)))
        self.buffer_acts.append(stored)
        self.buffer_tokens.append(tokens.astype(np.int32))
        self.next_batch = batch_index + 1
        if self.buffered_rows >= self.block_rows:
            while self.buffered_rows >= self.block_rows:
                self._write_block(self.block_rows)
            self._save_progress()

    def _write_block(self, rows: int) -> None:
        acts = self._buffered(self.buffer_acts, self.geometry.d, np.float32)
        toks = self._buffered(self.buffer_tokens, 3, np.int32)
        order = np.random.default_rng([self.seed, 0xB10C, self.blocks_written]).permutation(rows)
        block_acts, block_toks = acts[:rows][order].astype(self.dtype), toks[:rows][order]
        self.buffer_acts, self.buffer_tokens = [acts[rows:]], [toks[rows:]]
        start, shard = self.rows_written, self.geometry.shard_rows
        pending = []
        for offset in range(0, rows, shard):  # one write per shard file: no read-modify-write
            end = min(offset + shard, rows)
            pending.append(self.activations[start + offset:start + end].write(block_acts[offset:end]))
            pending.append(self.tokens[start + offset:start + end].write(block_toks[offset:end]))
        for future in pending:
            future.result()
        self.rows_written += rows
        self.blocks_written += 1

    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        """Write the last (partial) block, cut the arrays to size and write the ledger last."""
        if self.buffered_rows:
            self._write_block(self.buffered_rows)
        if self.rows_written == 0:
            raise DataError("the harvest produced no tokens: the text is empty, or every token was a special token")
        mean_sq_norm = self.sum_sq / self.rows_written
        if not np.isfinite(mean_sq_norm) or mean_sq_norm <= 0:
            raise DataError(f"cannot normalise the store: its mean squared norm is {mean_sq_norm}")
        for array in (self.activations, self.tokens):
            array.resize(exclusive_max=[self.rows_written, array.shape[1]], resize_metadata_only=True).result()
        metadata = read_json(os.path.join(self.store, METADATA_FILE))
        ledger = {
            **metadata,
            **facts,
            "complete": True,
            "num_tokens": self.rows_written,
            "files": list_files(self.store, self.geometry.as_dict()),
            "normalization": {
                "scale": float(np.sqrt(self.geometry.d / mean_sq_norm)),
                "mean_sq_norm": mean_sq_norm,
                "convention": "reader multiplies rows by scale so that E||x||^2 = d over the whole store; "
                              "divide reconstructions by scale for raw activations",
            },
        }
        write_json_atomic(os.path.join(self.store, LEDGER_FILE), ledger)
        for name in os.listdir(self.store):  # the harvest's scratch files
            if name == PROGRESS_FILE or name.startswith("carry-"):
                os.remove(os.path.join(self.store, name))
        return ledger


def _differences(old: dict, new: dict, prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            if inner:
                diffs.append(inner)
        elif canonical_json(a) != canonical_json(b):
            diffs.append(f"{prefix}{key}: store has {a!r}, now {b!r}")
    return "; ".join(diffs)


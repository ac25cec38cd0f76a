"""On-disk layout of an activation store, shared by the writer and the reader.

  STORE/
    metadata.json   what is being harvested (model, hookpoint, geometry); written first
    activations/    zarr3 array (tokens, d), float32 or bfloat16
    tokens/         zarr3 int32 array (tokens, 3): token id, context index, position
    progress.json   while harvesting: the batch to continue from (+ carry-<batch>.npz)
    ledger.json     written last: token count, normalisation, hashes, and every file of
                    the two arrays with its size (and its shard index's CRC-32). Without
                    it the store is incomplete and is not read; a file that is missing or
                    of another size than the ledger says is refused at open.

Both arrays use the zarr3 sharding codec: inner chunks of about `chunk_mb`
(the unit the reader shuffles and reads), shards of about `shard_mb` (one
file, written whole by one writer), with crc32c checksums on every chunk and
on each shard index, so flipped bytes are an error, never garbage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any

import numpy as np
import tensorstore as ts

from saejax.errors import DataError

FORMAT = "saejax-activations/1"
METADATA_FILE = "metadata.json"
LEDGER_FILE = "ledger.json"
PROGRESS_FILE = "progress.json"
ACTIVATIONS = "activations"
TOKENS = "tokens"
TOKEN_COLUMNS = ("token_id", "context_index", "position")
STORE_DTYPES = ("float32", "bfloat16")
# Rows of an unfinished store: zarr only stores written chunks, and the
# shape is cut to the real token count when the harvest finishes.
UNBOUNDED_ROWS = 2**40


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Rows per chunk and per shard; every shard holds a whole number of chunks."""

    d: int
    dtype: str
    chunk_rows: int
    shard_rows: int

    @classmethod
    def for_sizes(cls, d: int, dtype: str, chunk_mb: float, shard_mb: float) -> "Geometry":
        row_bytes = d * np.dtype(_numpy_dtype(dtype)).itemsize
        chunk_rows = _power_of_two_near(chunk_mb * 2**20 / row_bytes)
        shard_chunks = max(1, round(shard_mb / max(chunk_rows * row_bytes / 2**20, 1e-9)))
        return cls(d=d, dtype=dtype, chunk_rows=chunk_rows, shard_rows=chunk_rows * shard_chunks)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.d * np.dtype(_numpy_dtype(self.dtype)).itemsize

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _power_of_two_near(x: float) -> int:
    return int(2 ** max(0, round(np.log2(max(x, 1.0)))))


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def numpy_dtype(dtype: str):
    if dtype not in STORE_DTYPES:
        raise DataError(f"store dtype {dtype!r} is not one of {STORE_DTYPES}")
    return _numpy_dtype(dtype)


def _array_spec(path: str, rows: int, columns: int, dtype: str, geometry: Geometry) -> dict[str, Any]:
    checksummed = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": [rows, columns],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [geometry.shard_rows, columns]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [geometry.chunk_rows, columns],
                "codecs": checksummed,
                "index_codecs": checksummed,
            }}],
        },
    }


def create_arrays(store: str, geometry: Geometry, rows: int = UNBOUNDED_ROWS):
    """Open (creating if absent) the activation and token arrays for writing."""
    arrays = []
    for name, columns, dtype in ((ACTIVATIONS, geometry.d, geometry.dtype), (TOKENS, len(TOKEN_COLUMNS), "int32")):
        path = os.path.join(store, name)
        if os.path.exists(os.path.join(path, "zarr.json")):
            # A harvest killed inside finish() may have cut the shape already; undo that.
            existing = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, open=True).result()
            if existing.shape[0] != rows:
                existing.resize(exclusive_max=[rows, existing.shape[1]], resize_metadata_only=True).result()
        spec = _array_spec(path, rows, columns, dtype, geometry)
        try:
            arrays.append(ts.open(spec, open=True, create=True).result())
        except ValueError as e:
            raise DataError(f"{path} does not match this harvest's layout ({e}); harvest into a new --store path") from None
    return arrays


def open_arrays(store: str):
    """The two arrays of a finished store, read-only.

    A chunk that is absent (a deleted shard file, or an index entry of a
    truncated one) is a read error, not zarr's fill value: zeros would be
    trained on silently.
    """
    arrays = []
    for name in (ACTIVATIONS, TOKENS):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(store, name)},
                "fill_missing_data_reads": False}
        try:
            arrays.append(ts.open(spec, open=True, read=True).result())
        except ValueError as e:
            raise DataError(f"cannot open {os.path.join(store, name)} ({e}); the store is damaged: harvest it again") from None
    return arrays


def shard_file(store: str, row: int, geometry_shard_rows: int, array: str = ACTIVATIONS) -> str:
    """The file holding `row` (zarr3 default chunk keys: c/<shard>/0)."""
    return os.path.join(store, array, "c", str(row // geometry_shard_rows), "0")


def _index_bytes(geometry: dict[str, Any]) -> int:
    """Size of a shard's index at its end: 16 bytes per inner chunk, then a CRC-32C."""
    return int(geometry["shard_rows"]) // int(geometry["chunk_rows"]) * 16 + 4


def _index_crc(path: str, index_bytes: int) -> int:
    with open(path, "rb") as f:
        f.seek(max(os.fstat(f.fileno()).st_size - index_bytes, 0))
        return zlib.crc32(f.read(index_bytes))


def list_files(store: str, geometry: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Every file of the two arrays: its size and the CRC-32 of its shard index (zarr.json: whole file).

    Reading the index (a few hundred bytes a shard) rather than hashing whole
    shards keeps this cheap enough to check at every open.
    """
    files = {}
    for array in (ACTIVATIONS, TOKENS):
        for root, _, names in os.walk(os.path.join(store, array)):
            for name in names:
                path = os.path.join(root, name)
                size = os.path.getsize(path)
                tail = size if name == "zarr.json" else _index_bytes(geometry)
                files[os.path.relpath(path, store)] = {"bytes": size, "index_crc32": _index_crc(path, tail)}
    return dict(sorted(files.items()))


def file_problem(store: str, relative: str, recorded: dict[str, int] | None, geometry: dict[str, Any]) -> str:
    """What is wrong with one file of the store compared with its ledger entry ('' if nothing)."""
    path = os.path.join(store, relative)
    if not os.path.isfile(path):
        return "is missing"
    if recorded is None:
        return ""
    size = os.path.getsize(path)
    if size != recorded["bytes"]:
        return f"has {size} bytes but the ledger records {recorded['bytes']} (truncated or replaced)"
    tail = size if os.path.basename(relative) == "zarr.json" else _index_bytes(geometry)
    if _index_crc(path, tail) != recorded["index_crc32"]:
        return "has another shard index than the ledger records (replaced or corrupt)"
    return ""


def verify_files(store: str, ledger: dict[str, Any]) -> None:
    """Refuse a store whose array files do not match its ledger (stores written before it listed files pass)."""
    recorded = ledger.get("files")
    if recorded is None:
        return
    for relative, entry in recorded.items():
        problem = file_problem(store, relative, entry, ledger["geometry"])
        if problem:
            raise DataError(f"activation store {store}: {os.path.join(store, relative)} {problem}. "
                            "Nothing was trained on it. Restore that file from a backup or harvest the store again.")


def canonical_json(value: Any) -> str:
    """For comparing metadata: key order does not matter."""
    return json.dumps(value, sort_keys=True)


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); the store is damaged: harvest it again into a new path") from None


def read_ledger(store: str) -> dict[str, Any]:
    """The ledger of a finished store; a clear error for anything else."""
    store = os.path.abspath(os.path.expanduser(store))
    if not os.path.isdir(store):
        raise DataError(f"activation store {store} does not exist; create it with `saejax harvest --store {store}`")
    ledger = read_json(os.path.join(store, LEDGER_FILE))
    if ledger is None:
        if os.path.exists(os.path.join(store, METADATA_FILE)):
            raise DataError(
                f"activation store {store} is incomplete: it has no {LEDGER_FILE} (the harvest was interrupted "
                "or is still running). Run the same `saejax harvest` command again to finish it."
            )
        raise DataError(f"{store} is not an activation store (no {LEDGER_FILE} or {METADATA_FILE}); "
                        "point data.path at a directory written by `saejax harvest`")
    if ledger.get("format") != FORMAT:
        raise DataError(f"{store}/{LEDGER_FILE} has format {ledger.get('format')!r}; this saejax reads {FORMAT!r}")
    return ledger

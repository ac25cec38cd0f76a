"""The trained SAE as `sae.safetensors` + `cfg.json`, readable without orbax or JAX.

The safetensors file is written here rather than with `safetensors.numpy.save_file`
because that needs every tensor whole in host memory: a 16M-latent dictionary
is sharded over many devices (and hosts). The header is computed from the
global shapes, the file is sized, and each device's shard is written straight
into its slice through a memory map. Readers use the standard `safetensors`
package (`load_sae` below).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import jax
import numpy as np

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
           np.dtype(np.int64): "I64", np.dtype(np.float64): "F64"}


def _dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "BF16"
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors name") from None


def _header(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, position = {}, 0
    for name, array in tensors.items():
        size = int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
        header[name] = {"dtype": _dtype_name(array.dtype), "shape": list(array.shape),
                        "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(len(encoded) + 8) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded, offsets


def _write_tensor(path: str, offset: int, array) -> None:
    if array.size == 0:
        return
    target = np.memmap(path, dtype=array.dtype, mode="r+", offset=offset, shape=array.shape)
    if isinstance(array, jax.Array):
        for shard in array.addressable_shards:
            if shard.replica_id == 0:  # one writer per distinct shard
                target[shard.index] = np.asarray(shard.data)
    else:
        target[...] = array
    target.flush()
    del target


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write (possibly sharded, multi-host) arrays to `path` atomically.

    With several processes, `path` must be on a filesystem they share; every
    process writes its own shards and process 0 publishes the file.
    """
    header, offsets = _header(tensors, metadata or {})
    tmp = f"{path}.tmp"
    total = len(header) + sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in tensors.values())
    if jax.process_index() == 0:
        with open(tmp, "wb") as f:
            f.write(header)
            f.truncate(total)
    _sync("saejax_export_created")
    for name, array in tensors.items():
        _write_tensor(tmp, len(header) + offsets[name], array)
    _sync("saejax_export_written")
    if jax.process_index() == 0:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_json_atomic(path: str, payload: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def export_sae(directory: str, tensors: Mapping[str, Any], cfg: dict[str, Any]) -> tuple[str, str]:
    """Write sae.safetensors and cfg.json into `directory`; returns their paths."""
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    write_safetensors(weights_path, tensors, {"format": "saejax", "family": str(cfg.get("family", ""))})
    if jax.process_index() == 0:
        write_json_atomic(cfg_path, cfg)
    return weights_path, cfg_path


def load_sae(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors by name as numpy arrays, cfg) of an exported SAE."""
    from safetensors.numpy import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        cfg = json.load(f)
    return load_file(os.path.join(directory, WEIGHTS_FILE)), cfg

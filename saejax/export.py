"""The trained SAE as `sae.safetensors` + `cfg.json`, readable without orbax or JAX.

The safetensors file is written here rather than with `safetensors.numpy.save_file`
because that needs every tensor whole in host memory: a 16M-latent dictionary
is sharded over many devices (and hosts). The header is computed from the
global shapes, process 0 sizes the file, every process writes the shards its
devices hold straight into their slices (positioned writes of exactly their
bytes, so hosts sharing a network filesystem never overwrite each other), and
process 0 renames the finished file into place. Readers use the standard
`safetensors` package (`load_sae` below).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import jax
import numpy as np

from saejax.errors import write_failed

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
LAYER_NORM = "layer_norm"  # normalization.method of a per-token layer norm (OpenAI TopK, SAELens)

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


def _write_block(fd: int, offset: int, shape: tuple[int, ...], index: tuple[slice, ...], block: np.ndarray) -> None:
    """Write `block`, the part `index` of a C-order array of `shape` stored at `offset`, with pwrite.

    Only the block's own bytes are written, one contiguous run at a time, never
    whole pages through a memory map: hosts writing column blocks of the same
    rows to a network filesystem (NFS, Lustre) would otherwise overwrite each
    other's bytes with stale page contents.
    """
    block = np.ascontiguousarray(block)
    if block.size == 0:
        return
    starts = [s.start or 0 for s in index]
    # Trailing dimensions the block covers fully form contiguous runs together with one more dimension.
    split = len(shape)
    while split > 0 and block.shape[split - 1] == shape[split - 1]:
        split -= 1
    split = max(split - 1, 0)
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) * block.itemsize for i in range(len(shape))]
    runs = block.reshape(*block.shape[:split], -1) if split else block.reshape(1, -1)
    for lead in np.ndindex(*block.shape[:split]):
        position = offset + sum((starts[i] + lead[i]) * strides[i] for i in range(split)) + \
            sum(starts[i] * strides[i] for i in range(split, len(shape)))
        data = memoryview((runs[lead] if split else runs[0]).view(np.uint8))
        while data:
            written = os.pwrite(fd, data, position)
            data, position = data[written:], position + written


def _write_tensor(fd: int, offset: int, array) -> None:
    """Write this process's part of `array` (all of it if not a jax.Array) into the file at `offset`."""
    shape = tuple(array.shape)
    if isinstance(array, jax.Array):
        for shard in array.addressable_shards:
            if shard.replica_id == 0:  # one writer per distinct shard, whichever process holds it
                index = tuple(shard.index) + (slice(None),) * (len(shape) - len(shard.index))
                _write_block(fd, offset, shape, index, np.asarray(shard.data))
    elif jax.process_index() == 0:
        _write_block(fd, offset, shape, (slice(None),) * len(shape), np.asarray(array))


def to_host(array) -> np.ndarray:
    """The whole of a (possibly multi-host) array as numpy, on every process.

    `jax.device_get` refuses arrays with shards on other processes; those are
    all-gathered (a collective: every process must call this).
    """
    if isinstance(array, jax.Array) and not array.is_fully_addressable and not array.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


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
    try:
        if jax.process_index() == 0:
            with open(tmp, "wb") as f:
                f.write(header)
                f.truncate(total)
        _sync("saejax_export_created")
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for name, array in tensors.items():
                _write_tensor(fd, len(header) + offsets[name], array)
            os.fsync(fd)  # every writer flushes its own bytes before process 0 publishes the file
        finally:
            os.close(fd)
        _sync("saejax_export_written")
        if jax.process_index() == 0:
            os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):  # a half-written export is never left to be mistaken for one
            os.remove(tmp)
        raise write_failed("the exported SAE", path, e,
                           "The checkpoints are intact: free space there and run the same command again; "
                           "it exports without training again.") from None


def write_text_atomic(path: str, text: str) -> None:
    """Write to PATH.tmp, fsync, rename: readers see the old file or the new one, never a torn one.

    One writer per path at a time (the sweep table is written under a lock): a
    killed writer's PATH.tmp is overwritten by the next, not left behind.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_failed("", path, e, "The previous version of the file, if any, is intact: "
                           "free space there and run the same command again.") from None


def write_json_atomic(path: str, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


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


class SAE:
    """A trained SAE read back from `sae.safetensors` + `cfg.json`, for notebooks and other code.

    `encode(x)` / `decode(codes)` / `reconstruct(x)` run the family's own
    inference (JAX, one device) on raw activations: inputs are multiplied by
    the stored normalisation scale and reconstructions divided by it, so they
    are in the units of the activations given (pass `normalized=True` to skip
    that). `tensors` are numpy arrays by their exported names, `cfg` the
    parsed cfg.json, `family` the saejax family object.

    An SAE imported from OpenAI's TopK checkpoints (or SAELens's
    `normalize_activations="layer_norm"`) carries `normalization.method =
    "layer_norm"` instead of a scale: each token is centred and divided by its
    (unbiased) standard deviation + eps before encoding, and the
    reconstruction is multiplied back by it. `decode` then needs those
    per-token statistics, so use `reconstruct` (or `normalized=True`).
    """

    def __init__(self, tensors: dict[str, np.ndarray], cfg: dict[str, Any]):
        import jax.numpy as jnp

        from saejax.sharding import make_mesh

        self.tensors, self.cfg = tensors, cfg
        self.family = _family_from_cfg(cfg)
        normalization = cfg.get("normalization") or {}
        self.layer_norm = normalization.get("method") == LAYER_NORM
        self.eps = float(normalization.get("eps", 1e-5))
        self.scale = float(normalization.get("scale", 1.0))
        self.mesh = make_mesh(1, 1, jax.devices()[:1])
        self.params = {name: jnp.asarray(value) for name, value in tensors.items()}
        self._encode = jax.jit(lambda p, x: self.family.encode(p, x, self.mesh))
        self._decode = jax.jit(lambda p, c: self.family.decode(p, c, self.mesh))

    @property
    def d(self) -> int:
        return self.family.d

    @property
    def n(self) -> int:
        return self.family.n

    def _input(self, x, normalized: bool):
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected activations of shape (tokens, {self.d}), got {x.shape}")
        return x if normalized else self.normalize(x)[0]

    def normalize(self, x) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(x in the units the SAE encodes, (mean, std) to undo it per token) of raw activations."""
        x = np.asarray(x, np.float32)
        if not self.layer_norm:
            return x * np.float32(self.scale), (np.float32(0), np.float32(1 / self.scale))
        mu = x.mean(axis=-1, keepdims=True)
        centred = x - mu
        std = centred.std(axis=-1, ddof=1, keepdims=True)
        return centred / (std + np.float32(self.eps)), (mu, std)

    def encode(self, x, normalized: bool = False):
        """Codes (SparseCodes or DenseCodes of numpy arrays) of a (tokens, d) batch."""
        return jax.device_get(self._encode(self.params, self._input(x, normalized)))

    def decode(self, codes, normalized: bool = False) -> np.ndarray:
        recon = np.asarray(jax.device_get(self._decode(self.params, codes)))
        if normalized:
            return recon
        if self.layer_norm:
            raise ValueError("this SAE layer-normalises each token (cfg.json normalization.method = "
                             "layer_norm): decoding needs the token's mean and std; use reconstruct(x), "
                             "or decode(codes, normalized=True) for the normalised reconstruction")
        return recon / np.float32(self.scale)

    def __iter__(self):
        """Unpacks as (tensors, cfg), what load_sae returned before it returned an SAE."""
        return iter((self.tensors, self.cfg))

    def reconstruct(self, x, normalized: bool = False) -> np.ndarray:
        if normalized or not self.layer_norm:
            return self.decode(self.encode(x, normalized), normalized)
        x = self._input(x, True)  # the shape check
        xn, (mu, std) = self.normalize(x)
        return self.decode(self.encode(xn, True), True) * std + mu

    def dense_codes(self, x, normalized: bool = False) -> np.ndarray:
        """(tokens, n) codes as one dense numpy array."""
        from saejax.models.base import DenseCodes

        codes = self.encode(x, normalized)
        if isinstance(codes, DenseCodes):
            return np.asarray(codes.values)
        dense = np.zeros((codes.values.shape[0], self.n), np.float32)
        np.put_along_axis(dense, np.asarray(codes.indices), np.asarray(codes.values), axis=1)
        return dense


def _family_from_cfg(cfg: dict[str, Any]):
    """The family object an export describes (cfg.json of this version, or of TopK runs before it)."""
    from saejax.config import base_config, set_value
    from saejax.errors import ConfigError
    from saejax.models import FAMILIES, get_family

    name = cfg.get("family")
    if name not in FAMILIES:
        raise ConfigError(f"cfg.json names family {name!r}, which this saejax does not have; "
                          f"the families are: {', '.join(sorted(FAMILIES))}")
    config = base_config()
    set_value(config, "sae.family", name)
    set_value(config, "sae.d", int(cfg["d"]))
    set_value(config, "sae.n", int(cfg["n"]))
    options = cfg.get("options")
    if options is None:  # an export written before cfg.json carried the family's options
        options = {key: cfg[key] for key in FAMILIES[name].defaults() if key in cfg}
    for key, value in options.items():
        set_value(config, f"sae.{name}.{key}", value)
    set_inner_options(config, cfg)
    config.lock()
    return get_family(config)


def set_inner_options(config, cfg: dict[str, Any]) -> None:
    """The options of the families a wrapper family reads (cfg.json `options_of`), into `config`."""
    from saejax.config import set_value

    for inner, options in (cfg.get("options_of") or {}).items():
        for key, value in options.items():
            set_value(config, f"sae.{inner}.{key}", value)


def load_sae(directory: str) -> SAE:
    """The SAE exported into `directory` (sae.safetensors + cfg.json), ready to encode and decode."""
    from safetensors.numpy import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        cfg = json.load(f)
    return SAE(load_file(os.path.join(directory, WEIGHTS_FILE)), cfg)

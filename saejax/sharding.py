"""The one place that says how arrays are laid out over devices.

Every array in saejax names its axes logically ("batch", "latent", "embed");
`LOGICAL_TO_MESH` maps those names to the two mesh axes. Changing how the
model is split means changing this table and nothing else.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

# Logical array axis -> mesh axis (None = replicated).
LOGICAL_TO_MESH: Mapping[str, str | None] = {
    "batch": DATA_AXIS,  # tokens of a batch are split over data-parallel groups
    "latent": MODEL_AXIS,  # the dictionary (W_enc columns, W_dec rows, b_enc, optimizer state)
    "embed": None,  # the model's residual dimension d is never split
}


def spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for an array whose axes carry these logical names.

    Trailing replicated axes are dropped (P('model', None) -> P('model')), the
    canonical form JAX gives outputs, so inputs and outputs of the step have
    identical shardings and the step is compiled once.
    """
    mesh_axes = [LOGICAL_TO_MESH[a] if a is not None else None for a in logical_axes]
    while mesh_axes and mesh_axes[-1] is None:
        mesh_axes.pop()
    return PartitionSpec(*mesh_axes)


def named(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, spec(logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def resolve_mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
    """Fill a -1 entry from the device count; raise ValueError if the mesh cannot be built.

    With both sizes given, the mesh may use fewer devices than are available
    (the first data * model of them).
    """
    if data == -1 and model == -1:
        raise ValueError("mesh.data and mesh.model cannot both be -1; set one of them")
    if data == -1:
        if model <= 0 or num_devices % model:
            raise ValueError(f"mesh.model={model} does not divide the {num_devices} available devices")
        data = num_devices // model
    elif model == -1:
        if data <= 0 or num_devices % data:
            raise ValueError(f"mesh.data={data} does not divide the {num_devices} available devices")
        model = num_devices // data
    if data <= 0 or model <= 0:
        raise ValueError(f"mesh sizes must be positive (or -1), got data={data}, model={model}")
    if data * model > num_devices:
        raise ValueError(
            f"mesh data={data} x model={model} needs {data * model} devices, but only {num_devices} "
            "are available; set one axis to -1 to use what there is"
        )
    return data, model


def make_mesh(data: int, model: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'model') mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    data, model = resolve_mesh_shape(data, model, len(devices))
    if data * model < len(devices) and jax.process_count() > 1:
        raise ValueError(f"with {jax.process_count()} processes the mesh must use all {len(devices)} devices")
    return jax.make_mesh(
        (data, model), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: data * model]
    )


def tree_shardings(mesh: Mesh, axes_tree: Any) -> Any:
    """Map a pytree of logical-axis tuples to NamedShardings."""
    return jax.tree.map(
        lambda axes: named(mesh, axes), axes_tree, is_leaf=lambda x: isinstance(x, tuple)
    )


def per_device_bytes(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> int:
    """Bytes one device holds of a global array with this sharding."""
    shard_shape = sharding.shard_shape(tuple(shape))
    return int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(dtype).itemsize

"""The plan printed before training: devices, mesh, per-device memory, FLOPs.

The train step is compiled ahead of time from abstract shapes (no
allocation), so the same code plans a 64-device, 16M-latent run on a laptop
with simulated CPU devices (`saejax plan --devices 64`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np

from saejax.errors import OverBudgetError
from saejax.sharding import named, per_device_bytes, replicated

GIB = 1024**3


def batch_sharding(mesh):
    return named(mesh, ("batch", None))


def compile_train_step(algorithm, abstract_state, batch_size: int, mesh) -> jax.stages.Compiled:
    """AOT-compile `train_step` with explicit shardings and the state donated."""
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    abstract_batch = jax.ShapeDtypeStruct((batch_size, algorithm.family.d), np.float32, sharding=batch_sharding(mesh))
    jitted = jax.jit(
        algorithm.train_step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )
    return jitted.lower(abstract_state, abstract_batch).compile()


def all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """Shapes of every array produced by an all-gather in compiled HLO text."""
    shapes = []
    for match in re.finditer(r"=\s*(\(.*?\)|\S+)\s+all-gather(?:-start)?\(", hlo_text):
        for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", match.group(1)):
            shapes.append(tuple(int(x) for x in dims.split(",") if x))
    return shapes


@dataclasses.dataclass
class Plan:
    num_devices: int
    num_processes: int
    platform: str
    mesh_shape: dict[str, int]
    bytes_per_device: dict[str, int]
    flops_per_step: float  # analytic, whole mesh
    compiled_flops_per_device: float  # XLA's count for one device's program (all branches of conditionals)
    largest_all_gather: int  # elements in the largest all-gathered array
    batch_by_latents: int  # elements of a per-device (B, n) pre-activation block
    model: str = ""  # the family's description, e.g. "topk SAE d=768 n=16,384 k=32"

    @property
    def peak_bytes(self) -> int:
        return self.bytes_per_device["peak"]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _state_bytes(abstract_state, key: str | None = None) -> int:
    tree = abstract_state if key is None else abstract_state.get(key, {})
    return sum(per_device_bytes(a.shape, a.dtype, a.sharding) for a in jax.tree.leaves(tree))


def make_plan(compiled, abstract_state, family, config, mesh) -> Plan:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX returned one dict per program
        cost = cost[0] if cost else {}
    total_state = _state_bytes(abstract_state)
    params = _state_bytes(abstract_state, "params")
    optimizer = _state_bytes(abstract_state, "opt_state")
    batch = per_device_bytes((config.data.batch_size, family.d), np.float32, batch_sharding(mesh))
    temporaries = int(getattr(memory, "temp_size_in_bytes", 0)) if memory else 0
    outputs_not_aliased = 0
    if memory:
        outputs_not_aliased = max(0, int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes))
    bytes_per_device = {
        "params": params,
        "optimizer_state": optimizer,
        "other_state": total_state - params - optimizer,
        "batch": batch,
        "temporaries": temporaries,
        "peak": total_state + batch + temporaries + outputs_not_aliased,
    }
    shapes = all_gather_shapes(compiled.as_text())
    largest = max((int(np.prod(s, dtype=np.int64)) for s in shapes), default=0)
    data_size, model_size = mesh.shape["data"], mesh.shape["model"]
    return Plan(
        num_devices=mesh.size,
        num_processes=jax.process_count(),
        platform=mesh.devices.flat[0].platform,
        mesh_shape={"data": data_size, "model": model_size},
        bytes_per_device=bytes_per_device,
        flops_per_step=family.flops_per_step(config.data.batch_size),
        compiled_flops_per_device=float(cost.get("flops", 0.0)),
        largest_all_gather=largest,
        batch_by_latents=(config.data.batch_size // data_size) * (family.n // model_size),
        model=family.describe(),
    )


def _gb(x: float) -> str:
    return f"{x / GIB:8.3f} GiB"


def format_plan(plan: Plan, config) -> str:
    sae, b = config.sae, plan.bytes_per_device
    lines = [
        f"plan: {plan.model}, batch {config.data.batch_size:,} tokens",
        f"  devices        {plan.num_devices} x {plan.platform} in {plan.num_processes} process(es); "
        f"mesh data={plan.mesh_shape['data']} x model={plan.mesh_shape['model']} "
        f"({sae.n // plan.mesh_shape['model']:,} latents and {config.data.batch_size // plan.mesh_shape['data']:,} tokens per device)",
        "  per device     " + _gb(b["params"]) + " params",
        "                 " + _gb(b["optimizer_state"]) + " optimizer state",
        "                 " + _gb(b["other_state"]) + " other state (firing counters, family state, EMA)",
        "                 " + _gb(b["batch"]) + " batch",
        "                 " + _gb(b["temporaries"]) + " temporaries (XLA memory analysis of the compiled step)",
        "                 " + _gb(b["peak"]) + " peak",
        f"  FLOPs / step   {plan.flops_per_step:.3e} (analytic, all devices); "
        f"{plan.compiled_flops_per_device:.3e} per device (XLA, counting every branch of AuxK's conditionals)",
        f"  collectives    largest all-gather {plan.largest_all_gather:,} elements "
        f"(a per-device batch x latents block is {plan.batch_by_latents:,})",
    ]
    if config.device_memory_gb:
        lines.append(f"  budget         {config.device_memory_gb:g} GB per device "
                     f"({'fits' if plan.peak_bytes <= config.device_memory_gb * 1e9 else 'EXCEEDED'})")
    return "\n".join(lines)


def check_budget(plan: Plan, config) -> None:
    budget = config.device_memory_gb
    if budget and plan.peak_bytes > budget * 1e9:
        raise OverBudgetError(
            f"the step needs {plan.peak_bytes / 1e9:.2f} GB per device, over the budget of "
            f"device_memory_gb={budget:g}. Split the dictionary over more devices (mesh.model), "
            "lower data.batch_size, or raise the budget if the devices have more memory."
        )

"""What an SAE family provides to the training algorithms.

A family (TopK, ReLU+L1, JumpReLU, ...) owns its parameters, their logical
axes, its initialisation, its loss, and the constraints on its weights. The
training algorithm (Adam on the loss, PAM-SGD, ...) and the trainer only go
through this interface, so a new family is one new file registered in
`saejax.models`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, see saejax.sharding
    description: str = ""


@dataclasses.dataclass
class LossOutput:
    """What a family's loss returns besides the scalar it is differentiated on."""

    metrics: dict[str, jax.Array]  # scalars, averaged over the global batch
    fired: jax.Array  # (n,) bool: latents that fired on this batch, for dead-latent tracking


jax.tree_util.register_dataclass(LossOutput, data_fields=["metrics", "fired"], meta_fields=[])


class SAEFamily(abc.ABC):
    name: ClassVar[str]

    def __init__(self, config):
        self.config = config
        self.d = int(config.sae.d)
        self.n = int(config.sae.n)

    @abc.abstractmethod
    def param_specs(self) -> Mapping[str, ParamSpec]:
        """Shapes and logical axes of every parameter."""

    @abc.abstractmethod
    def init_params(self, rng: jax.Array, sample: jax.Array) -> Params:
        """Initial parameters; `sample` is a (rows, d) sample of (normalised) training data."""

    @abc.abstractmethod
    def loss(self, params: Params, batch: jax.Array, dead: jax.Array, mesh: Mesh) -> tuple[jax.Array, LossOutput]:
        """Scalar training loss of a global (B, d) batch; `dead` is the (n,) dead-latent mask."""

    @abc.abstractmethod
    def flops_per_step(self, batch_size: int) -> float:
        """Analytic FLOPs of one training step (forward, backward, optimizer) for the whole mesh."""

    @abc.abstractmethod
    def export(self, params: Params) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        """Tensors by their published names and the fields of cfg.json describing them."""

    def dictionary(self, params: Params) -> jax.Array:
        """(n, d) decoder directions, one row per latent (used for feature recovery)."""
        return params["W_dec"]

    def project_gradients(self, grads: Params, params: Params) -> Params:
        """Adjust gradients before the optimizer (e.g. keep decoder rows on the sphere)."""
        return grads

    def apply_constraints(self, params: Params) -> Params:
        """Re-impose weight constraints after the optimizer update."""
        return params


def unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def remove_parallel_component(grad: jax.Array, rows: jax.Array) -> jax.Array:
    """g_i <- g_i - (g_i . w_i) w_i for unit-norm rows w_i."""
    return grad - jnp.sum(grad * rows, axis=1, keepdims=True) * rows


def normalized_mse(x: jax.Array, recon: jax.Array) -> jax.Array:
    """sum ||x - recon||^2 / sum ||x - mean_batch(x)||^2 (fraction of variance unexplained)."""
    num = jnp.sum(jnp.square(x - recon))
    den = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)))
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)

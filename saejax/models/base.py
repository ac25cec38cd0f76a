"""What an SAE family provides to the training algorithms, the trainer and inference.

A family (TopK, ReLU+L1, JumpReLU, ...) owns its config group (`sae.<name>.*`:
defaults and checks), its parameters and their logical axes, any state it
keeps that is not trained by gradients (a threshold estimate, an adaptive
penalty coefficient), its initialisation, its loss, the constraints on its
weights, and its inference `encode`/`decode`. The training algorithm (Adam on
the loss, PAM-SGD, ...), the trainer, evaluation and export only go through
this interface, so a new family is one new file registered in `saejax.models`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from saejax.errors import ConfigError

Params = dict[str, jax.Array]
FamilyState = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, see saejax.sharding
    description: str = ""
    dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a loss sees besides parameters, family state and batch."""

    step: jax.Array  # int32 scalar: the step being taken (0 for the first)
    dead: jax.Array  # (n,) bool: latents that have not fired in sae.dead_tokens tokens
    mesh: Mesh


@dataclasses.dataclass
class LossOutput:
    """What a family's loss returns besides the scalar it is differentiated on."""

    metrics: dict[str, jax.Array]  # scalars, averaged over the global batch
    fire_counts: jax.Array  # (n,) int32: tokens of this batch on which each latent fired
    state: FamilyState = dataclasses.field(default_factory=dict)  # the family state after this step


jax.tree_util.register_dataclass(LossOutput, data_fields=["metrics", "fire_counts", "state"], meta_fields=[])


@dataclasses.dataclass
class SparseCodes:
    """Codes as (B, m) values and their (B, m) global latent indices (zeros are allowed)."""

    values: jax.Array
    indices: jax.Array


@dataclasses.dataclass
class DenseCodes:
    """Codes as a (B, n) block, latent-sharded like the dictionary."""

    values: jax.Array


jax.tree_util.register_dataclass(SparseCodes, data_fields=["values", "indices"], meta_fields=[])
jax.tree_util.register_dataclass(DenseCodes, data_fields=["values"], meta_fields=[])
Codes = SparseCodes | DenseCodes


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class SAEFamily(abc.ABC):
    """One SAE architecture. Subclasses set `name`, `sparsity_key` and implement the abstract methods.

    `sparsity_key` names the key of the family's group that controls sparsity
    (k, an L1 coefficient, a target L0): results, tables and fits report it.
    `has_k` says whether that key is a number of active latents per token
    (the axis of Gao et al.'s scaling laws).
    """

    name: ClassVar[str]
    sparsity_key: ClassVar[str]
    has_k: ClassVar[bool] = False
    # True when decode(codes) is exactly codes @ W_dec + params[decoder_bias] (closed-form decoder
    # solvers such as PAM-SGD rely on it); a family must declare it, so the default is False.
    decoder_linear_in_codes: ClassVar[bool] = False
    decoder_bias: ClassVar[str] = "b_pre"  # the parameter added to the reconstruction

    # ------------------------------------------------------------------ config (class level)

    @classmethod
    @abc.abstractmethod
    def defaults(cls) -> ml_collections.ConfigDict:
        """The family's own keys and their defaults: the group `sae.<name>`."""

    @classmethod
    def check(cls, options, config) -> None:
        """Raise ConfigError for bad values of the family's keys (`options` = config.sae.<name>)."""

    @classmethod
    def unhashed_defaults(cls) -> dict[str, Any]:
        """Keys added to the group after runs existed: left out of run identity at these values,
        so those runs keep their identity and sweep hash."""
        return {}

    @classmethod
    def inner_families(cls, options) -> tuple[str, ...]:
        """Other families whose config groups this one reads (a wrapper's inner family). Default: none.

        `options` is the family's group (a ConfigDict or a dict). Those groups may be set in a run
        of this family, are part of its identity (config.active_tree) and go into its export
        (cfg.json `options_of`).
        """
        return ()

    # ------------------------------------------------------------------ construction

    def __init__(self, config):
        self.config = config
        self.d = int(config.sae.d)
        self.n = int(config.sae.n)
        self.options = config.sae[self.name]
        self.fire_threshold = float(config.sae.fire_threshold)
        self.compute_dtype = str(config.train.compute_dtype)
        self.topk_impl = str(config.train.topk_impl)

    def sparsity_control(self) -> dict[str, Any]:
        """{"name": key, "value": value, "is_k": bool}: the declared sparsity control."""
        return {"name": self.sparsity_key, "value": self.options[self.sparsity_key], "is_k": self.has_k}

    def describe(self) -> str:
        """A short description for plans and logs, e.g. "topk SAE d=768 n=16,384 k=32"."""
        return f"{self.name} SAE d={self.d} n={self.n:,} {self.sparsity_key}={self.options[self.sparsity_key]}"

    def default_learning_rate(self) -> float:
        """Used when optim.lr is unset: Gao et al.'s 2e-4 / sqrt(n / 2^14)."""
        return 2e-4 / math.sqrt(self.n / 2**14)

    # ------------------------------------------------------------------ parameters and state

    @abc.abstractmethod
    def param_specs(self) -> Mapping[str, ParamSpec]:
        """Shapes and logical axes of every parameter."""

    @abc.abstractmethod
    def init_params(self, rng: jax.Array, sample: jax.Array) -> Params:
        """Initial parameters; `sample` is a (rows, d) sample of (normalised) training data."""

    def state_specs(self) -> Mapping[str, ParamSpec]:
        """Shapes and logical axes of the family state (not trained by gradients). Default: none."""
        return {}

    def init_state(self, params: Params, sample: jax.Array) -> FamilyState:
        """The family state at step 0."""
        return {}

    # ------------------------------------------------------------------ training

    @abc.abstractmethod
    def loss(self, params: Params, state: FamilyState, batch: jax.Array,
             ctx: LossContext) -> tuple[jax.Array, LossOutput]:
        """Scalar training loss of a global (B, d) batch, and the new family state in LossOutput."""

    def project_gradients(self, grads: Params, params: Params) -> Params:
        """Adjust gradients before the optimizer (e.g. keep decoder rows on the sphere)."""
        return grads

    def apply_constraints(self, params: Params) -> Params:
        """Re-impose weight constraints after the optimizer update."""
        return params

    @abc.abstractmethod
    def flops_per_step(self, batch_size: int) -> float:
        """Analytic FLOPs of one training step (forward, backward, optimizer) for the whole mesh."""

    # ------------------------------------------------------------------ inference

    def inference_params(self, params: Params, state: FamilyState) -> Params:
        """What encode/decode and the export use: the parameters plus any state inference needs."""
        return dict(params)

    def inference_specs(self) -> Mapping[str, ParamSpec]:
        """Specs of `inference_params` (default: the parameters')."""
        return self.param_specs()

    def gate(self, values: jax.Array) -> jax.Array:
        """The scalar function of the pre-activations a family's selection keeps (ReLU by default).

        The selection (top-k, a threshold, pre > 0) decides which latents are on; the gate gives
        their values. A wrapper family (saejax.models.rational) replaces it, keeping the selection.
        """
        return jax.nn.relu(values)

    @abc.abstractmethod
    def encode(self, params: Params, x: jax.Array, mesh: Mesh) -> Codes:
        """Inference codes of a (B, d) batch (normalised activations), as the family infers."""

    @abc.abstractmethod
    def decode(self, params: Params, codes: Codes, mesh: Mesh) -> jax.Array:
        """(B, d) reconstruction from codes."""

    @abc.abstractmethod
    def activation(self) -> dict[str, Any]:
        """Machine-readable description of the inference activation (kind, k, threshold, ...)."""

    def dictionary(self, params: Params) -> jax.Array:
        """(n, d) decoder directions, one row per latent (used for feature recovery)."""
        return params["W_dec"]

    # ------------------------------------------------------------------ export

    def export(self, params: Params) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        """Tensors by name (the inference parameters) and the cfg.json fields describing them."""
        specs = self.inference_specs()
        axis_names = {"latent": "n", "embed": "d", None: "1"}
        cfg: dict[str, Any] = {
            "family": self.name,
            "d": self.d,
            "n": self.n,
            "activation": self.activation(),
            "options": self.options.to_dict(),
            "sparsity_control": self.sparsity_control(),
            "layout": {name: [axis_names[a] for a in spec.axes] for name, spec in specs.items()},
        }
        if self.has_k:
            cfg["k"] = int(self.sparsity_control()["value"])
        return {name: params[name] for name in specs}, cfg


# ---------------------------------------------------------------------------- shared helpers


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


def dense_fire_counts(codes: jax.Array, threshold: float) -> jax.Array:
    """(n,) int32 tokens on which each latent of a dense (B, n) code block fired (> threshold)."""
    return jnp.sum(codes > threshold, axis=0, dtype=jnp.int32)

"""Plumbing shared by the families whose codes are a dense (B, n) block: ReLU, ProLU, Gated.

Plain jnp under jit. Every (B, n) block carries a ("batch", "latent") sharding
constraint, so XLA's SPMD partitioner keeps each device on its own latents: the
encoder matmul needs no communication, the decoder matmul sums partial
reconstructions over the model axis (a (B, d) all-reduce), and no (B, n) array
is ever gathered.

The sparsity penalty is the decoder-norm weighted L1 of Anthropic's April 2024
recipe, on the same scale as the nmse: with SSE = sum_b ||x_b - x_hat_b||^2 and
V = sum_b ||x_b - mean_batch(x)||^2 (the nmse denominator),

    loss = (SSE + l1_coef * sum_b sum_i |z_bi| * ||w_dec,i||) / V  (+ family terms).

So `l1_coef` weighs one unit of decoder-weighted code against one unit of squared
error, as Anthropic's lambda does on inputs scaled to E||x||^2 = d (saejax's
normalisation); dividing by V makes the loss invariant to the batch's spread.
The coefficient is warmed up linearly from 0 over the first steps.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from ml_collections import config_dict

from saejax.models.base import DenseCodes, LossOutput, SAEFamily, dense_fire_counts, normalized_mse, require
from saejax.ops.geometric_median import geometric_median
from saejax.sharding import named


def sharded_block(block: jax.Array, mesh: Mesh) -> jax.Array:
    """A (B, n) array laid out like the data (rows) and the dictionary (columns)."""
    return jax.lax.with_sharding_constraint(block, named(mesh, ("batch", "latent")))


def encoder_product(x, center, w_enc, mesh: Mesh, compute_dtype: str = "float32") -> jax.Array:
    """(x - center) @ w_enc, computed as x @ w_enc - center @ w_enc.

    x is data (no gradient), so the center's gradient is one mat-vec with the
    batch-summed cotangent instead of a (B, n) x (n, d) matmul.
    """
    dtype = jnp.dtype(compute_dtype)
    x = jax.lax.stop_gradient(x)
    product = jnp.dot(x.astype(dtype), w_enc.astype(dtype), preferred_element_type=jnp.float32)
    return sharded_block(product - center @ w_enc, mesh)


def decode_block(codes, w_dec, bias, compute_dtype: str = "float32") -> jax.Array:
    """codes @ w_dec + bias for a dense (B, n) code block."""
    dtype = jnp.dtype(compute_dtype)
    return jnp.dot(codes.astype(dtype), w_dec.astype(dtype), preferred_element_type=jnp.float32) + bias


def variance_sum(x: jax.Array) -> jax.Array:
    """sum_b ||x_b - mean_batch(x)||^2: the denominator of the nmse (floored above 0)."""
    spread = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)))
    return jnp.maximum(spread, jnp.finfo(jnp.float32).tiny)


def weighted_l1(codes: jax.Array, w_dec: jax.Array, x: jax.Array) -> jax.Array:
    """sum_b sum_i |z_bi| * ||w_dec,i|| / V: the L1 penalty on the nmse's scale (see the module doc)."""
    norms = jnp.linalg.norm(w_dec, axis=1)
    return jnp.sum(jnp.abs(codes) * norms) / variance_sum(x)


def active_per_token(codes: jax.Array) -> jax.Array:
    """Mean number of non-zero codes per token (the L0)."""
    return jnp.mean(jnp.sum(codes > 0, axis=1, dtype=jnp.float32))


def random_directions(rng: jax.Array, n: int, d: int, norm: float) -> jax.Array:
    """(n, d) rows pointing in uniformly random directions, each of L2 norm `norm`."""
    rows = jax.random.normal(rng, (n, d), jnp.float32)
    return norm * rows / jnp.maximum(jnp.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------- config: L1 coefficient, init


def dense_defaults(group: ml_collections.ConfigDict, coef: float) -> None:
    group.l1_coef = coef  # weight of the decoder-norm weighted L1 (saejax.models.dense)
    group.l1_warmup_steps = config_dict.placeholder(int)  # linear warm-up of l1_coef from 0; unset: fraction
    group.l1_warmup_fraction = 0.05  # used when l1_warmup_steps is unset: this fraction of train.steps
    group.init_decoder_norm = 0.1  # initial L2 norm of every decoder row (random directions)


def check_dense(options, prefix: str) -> None:
    require(options.l1_coef >= 0, f"{prefix}.l1_coef={options.l1_coef} must be >= 0")
    require(options.l1_warmup_steps is None or options.l1_warmup_steps >= 0,
            f"{prefix}.l1_warmup_steps={options.l1_warmup_steps} must be >= 0 (or unset)")
    require(0 <= options.l1_warmup_fraction <= 1,
            f"{prefix}.l1_warmup_fraction={options.l1_warmup_fraction} must be in [0, 1]")
    require(options.init_decoder_norm > 0, f"{prefix}.init_decoder_norm={options.init_decoder_norm} must be > 0")


def resolve_warmup_steps(options, train_steps: int) -> int:
    if options.l1_warmup_steps is not None:
        return int(options.l1_warmup_steps)
    return int(round(float(options.l1_warmup_fraction) * train_steps))


def warmed_up(coef: float, step: jax.Array, warmup_steps: int) -> jax.Array:
    """coef * min(1, step / warmup_steps): 0 at the first step, coef from step warmup_steps on."""
    if warmup_steps == 0:
        return jnp.asarray(coef, jnp.float32)
    return coef * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


# ---------------------------------------------------------------------------- the shared base


class DenseFamily(SAEFamily, abc.ABC):
    """A family with dense codes z (B, n), x_hat = z @ W_dec + decoder bias, and an L1 penalty."""

    sparsity_key = "l1_coef"
    decoder_linear_in_codes = True
    decoder_bias = "b_pre"  # the parameter added to the output (and subtracted before encoding)

    def __init__(self, config):
        super().__init__(config)
        self.l1_coef = float(self.options.l1_coef)
        self.warmup_steps = resolve_warmup_steps(self.options, int(config.train.steps))
        self.init_decoder_norm = float(self.options.init_decoder_norm)

    def l1_coef_at(self, step: jax.Array) -> jax.Array:
        return warmed_up(self.l1_coef, step, self.warmup_steps)

    def tied_init(self, rng: jax.Array, sample: jax.Array) -> dict[str, jax.Array]:
        """Decoder rows random directions of norm init_decoder_norm, W_enc = W_dec^T, the decoder
        bias the geometric median of the sample (Anthropic's init, with TopK's b_pre)."""
        w_dec = random_directions(rng, self.n, self.d, self.init_decoder_norm)
        return {"W_enc": w_dec.T, "W_dec": w_dec, self.decoder_bias: geometric_median(sample)}

    def loss(self, params, state, batch, ctx):
        """nmse + l1_coef(step) * weighted L1 of the codes (ReLU, ProLU; Gated adds its own terms)."""
        z = self.codes(params, batch, ctx.mesh)
        nmse = normalized_mse(batch, self.reconstruct(params, z))
        l1 = weighted_l1(z, params["W_dec"], batch)
        coef = self.l1_coef_at(ctx.step)
        metrics = {"nmse": nmse, "l0": active_per_token(z), "l1_loss": l1, "l1_coef": coef}
        return nmse + coef * l1, LossOutput(metrics=metrics, fire_counts=self.fire_counts(z))

    @abc.abstractmethod
    def codes(self, params, x: jax.Array, mesh: Mesh) -> jax.Array:
        """The (B, n) code block (latent-sharded)."""

    def reconstruct(self, params, codes: jax.Array) -> jax.Array:
        return decode_block(codes, params["W_dec"], params[self.decoder_bias], self.compute_dtype)

    def fire_counts(self, codes: jax.Array) -> jax.Array:
        return dense_fire_counts(codes, self.fire_threshold)

    def encode(self, params, x, mesh):
        return DenseCodes(self.codes(params, x, mesh))

    def decode(self, params, codes, mesh):
        return self.reconstruct(params, sharded_block(codes.values, mesh))

    def dense_flops(self, batch_size: int, matmuls: int, elementwise: int) -> float:
        """`matmuls` (B, d) x (d, n)-sized products per step, `elementwise` ops per (B, n) entry, Adam."""
        d, n = self.d, self.n
        optimizer = 2 * n * d * 10  # Adam on W_enc and W_dec (elementwise)
        return float(batch_size * n * (2 * d * matmuls + elementwise) + optimizer)

"""Binary Autoencoder, BAE (Cho et al. 2025, arXiv 2509.20997; code: hc495/Binary_Autoencoder).

h = step(x @ W_enc + b_enc) in {0, 1}^n;  x_hat = h @ W_dec + b_dec (b_dec optional).
Loss: nmse + w_e * on(step) * H + w_c * C, over the GLOBAL batch of B tokens:

  H = sum_j H_b(p_j) in bits, p_j = mean_b h_bj, H_b(p) = -p log2 p - (1-p) log2 (1-p);
      on(step) = [step >= entropy_warmup_steps]; H counts as 0 while H < entropy_threshold
      (the reference's `entropy_of_binary_hidden`; its 1e-10 inside the logs is kept).
  C = sum_{i != j} |Cov(h_i, h_j)|, Cov with the 1/(B-1) of torch.cov.

The step has no derivative; its straight-through estimators (`sae.binary.estimator`), with g
the upstream gradient and u the pre-activation:
  sign     dL/du = g                               (the reference's SignBinarization)
  sign_s   dL/du = g * (1 - g)                     (the reference's SignBinarization_sigmoid:
                                                    a function of g, not of u)
  sigmoid  dL/du = g * s (1 - s) / T, s = sigmoid(u / T)   (the surrogate the paper's formula
                                                    suggests, with a temperature T)

Units: the reference adds w_e * H to torch's elementwise mean squared error of raw activations;
saejax's nmse is the squared error over the batch variance, on inputs scaled to E||x||^2 = d, so
it is about the elementwise MSE of unit-variance inputs and w_e keeps the reference's meaning only
up to the activations' variance. H is up to n bits, so w_e * n is what to compare with the nmse.

Sharding: W_enc columns, b_enc and W_dec rows are split over the `model` axis (S shards of
m = n / S latents), the batch over `data` (D groups of B / D rows). The encoder and the decoder are
plain jnp with ("batch", "latent") constraints, so XLA partitions them (a (B, d) all-reduce for the
decode). The decode is a dense (B, n) x (n, d) product of 0/1 codes: BAE fixes no number of active
latents (its codes fire on ~half the latents at init), so a sparse gather path would need a
capacity it does not have.

H runs inside shard_map: per-latent counts psum'd over `data` give the global p (n/S floats per
device), the local entropies psum'd over `model` give H. C runs as a ring (see `covariance_ring`):
no device holds more than an (m, m) block of the n x n covariance.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from saejax.models.base import (
    DenseCodes,
    LossOutput,
    ParamSpec,
    SAEFamily,
    dense_fire_counts,
    normalized_mse,
    require,
)
from saejax.models.dense import decode_block, sharded_block
from saejax.ops import vma
from saejax.sharding import DATA_AXIS, MODEL_AXIS, spec

PREFIX = "sae.binary"
ESTIMATORS = ("sign", "sign_s", "sigmoid")
LOG_EPS = 1e-10  # inside the logs, as in the reference's entropy


# ---------------------------------------------------------------------------- straight-through step


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def binarize(pre: jax.Array, estimator: str, temperature: float) -> jax.Array:
    """1[pre > 0] as float32, with the straight-through gradient named by `estimator`."""
    return (pre > 0).astype(jnp.float32)


def _binarize_fwd(pre, estimator, temperature):
    return binarize(pre, estimator, temperature), pre


def _binarize_bwd(estimator, temperature, pre, g):
    if estimator == "sign":
        return (g,)
    if estimator == "sign_s":
        return (g * (1.0 - g),)  # what the reference's backward does: g is its own "sigmoid"
    s = jax.nn.sigmoid(pre / temperature)
    return (g * s * (1.0 - s) / temperature,)


binarize.defvjp(_binarize_fwd, _binarize_bwd)


# ---------------------------------------------------------------------------- global-batch terms


def bernoulli_bits(p: jax.Array) -> jax.Array:
    """H_b(p) in bits, with the reference's 1e-10 inside the logs.

    The max(., 0) keeps XLA from folding (1 - p) + 1e-10 into (1 + 1e-10) - p, which is 0 in
    float32 at p = 1 (a latent firing on every token) and made the loss NaN.
    """
    q = 1.0 - p
    return -(p * jnp.log2(jnp.maximum(p, 0.0) + LOG_EPS) + q * jnp.log2(jnp.maximum(q, 0.0) + LOG_EPS))


def entropy_bits(h: jax.Array, mesh: Mesh) -> jax.Array:
    """sum_j H_b(p_j) of a (B, n) code block, p_j the firing rate over the global batch.

    Per device: its (B/D, n/S) rows summed, one psum of n/S floats over `data`, one scalar psum
    over `model`.
    """
    rows = h.shape[0]

    def local(block):
        p = jax.lax.psum(jnp.sum(block, axis=0), DATA_AXIS) / rows
        return jax.lax.psum(jnp.sum(bernoulli_bits(p)), MODEL_AXIS)

    return jax.shard_map(local, mesh=mesh, in_specs=spec(("batch", "latent")), out_specs=P())(h)


def _ring_perm(shards: int):
    return [(i, (i + 1) % shards) for i in range(shards)]


def _gram(mine, other, denom):
    """(m, m) block of the global-batch covariance: local rows' products psum'd over `data`."""
    return jax.lax.psum(mine.T @ other, DATA_AXIS) / denom


def _ring_forward(hc, denom, shards):
    """Inside shard_map: sum over this device's latents i and all j != i of |Cov_ij|."""
    block = _gram(hc, hc, denom)
    total = jnp.sum(jnp.abs(block)) - jnp.sum(jnp.abs(jnp.diagonal(block)))

    def hop(_, carry):
        other, total = carry
        other = jax.lax.ppermute(other, MODEL_AXIS, _ring_perm(shards))
        return other, total + jnp.sum(jnp.abs(_gram(hc, other, denom)))

    _, total = jax.lax.fori_loop(1, shards, hop, (hc, total))
    return jax.lax.psum(total, MODEL_AXIS)


def _ring_backward(hc, ct, denom, shards):
    """Inside shard_map: dC/dhc for this device's block, recomputing each (m, m) sign block.

    C holds |G_st| and |G_ts| = |G_st^T| for every pair of shards, so
    dC/dhc_s = (2 / (B-1)) sum_t hc_t sign(G_st)^T (own block: its diagonal excluded).
    """
    signs = jnp.sign(_gram(hc, hc, denom))
    signs = signs - jnp.diag(jnp.diagonal(signs))
    grad = hc @ signs.T

    def hop(_, carry):
        other, grad = carry
        other = jax.lax.ppermute(other, MODEL_AXIS, _ring_perm(shards))
        return other, grad + other @ jnp.sign(_gram(hc, other, denom)).T

    _, grad = jax.lax.fori_loop(1, shards, hop, (hc, grad))
    return grad * (2.0 * ct / denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def covariance_ring(hc: jax.Array, mesh: Mesh) -> jax.Array:
    """C = sum_{i != j} |G_ij|, G = hc^T hc / (B - 1), for centred (B, n) codes, blockwise.

    A ring over the S model shards: each device keeps its (B/D, m) block, and the blocks of the
    others pass by one ppermute at a time; at each hop it forms one (m, m) block of G (local rows,
    psum'd over `data`) and adds |G|. The backward runs the ring again and recomputes the signs,
    so nothing of size n x n (nor S blocks) is kept.

    Communication per step, per device: forward S-1 ppermutes of B/D x m floats and S all-reduces
    over `data` of m x m floats (none when D = 1); the backward the same again. Compute: each
    device forms S (m, m) blocks from B/D rows forward and twice that backward (6 B n^2 flops
    over the mesh). Every pair of shards is formed twice (s, t and t, s): halving it would need
    an odd/even schedule the ring does not have.
    """
    return _covariance(hc, mesh)


def _covariance(hc, mesh):
    denom = float(hc.shape[0] - 1)
    shards = mesh.shape[MODEL_AXIS]
    block = spec(("batch", "latent"))
    run = jax.shard_map(lambda b: _ring_forward(b, denom, shards), mesh=mesh, in_specs=block, out_specs=P())
    return run(hc)


def _covariance_fwd(hc, mesh):
    return _covariance(hc, mesh), hc


def _covariance_bwd(mesh, hc, ct):
    denom = float(hc.shape[0] - 1)
    shards = mesh.shape[MODEL_AXIS]
    block = spec(("batch", "latent"))
    run = jax.shard_map(lambda b, c: _ring_backward(b, vma.vary_like(c, b), denom, shards), mesh=mesh,
                        in_specs=(block, P()), out_specs=block)
    return (run(hc, ct),)


covariance_ring.defvjp(_covariance_fwd, _covariance_bwd)


def covariance_sum(h: jax.Array, mesh: Mesh) -> jax.Array:
    """sum_{i != j} |Cov(h_i, h_j)| over the global batch (centring by autodiff, the rest by ring)."""
    centred = sharded_block(h - jnp.mean(h, axis=0, keepdims=True), mesh)
    return covariance_ring(centred, mesh)


# ---------------------------------------------------------------------------- the family


class Binary(SAEFamily):
    name = "binary"
    sparsity_key = "entropy_weight"
    has_k = False

    @classmethod
    def defaults(cls):
        g = ml_collections.ConfigDict()
        # The width is sae.n; the paper uses n = 4 d.
        g.estimator = "sign_s"  # straight-through estimator: sign | sign_s | sigmoid (module docstring)
        g.temperature = 1.0  # T of the sigmoid estimator
        g.entropy_weight = 1e-4  # w_e per bit; H is up to n bits (see the units in the module docstring)
        g.entropy_warmup_steps = 0  # the entropy term is off for the first steps
        g.entropy_threshold = 0.0  # H below this many bits counts as 0 (the reference's threshold)
        g.covariance_weight = 0.0  # w_c; the term costs ~6 B n^2 flops a step, so it is off by default
        g.output_bias = True  # b_dec added to the reconstruction
        return g

    @classmethod
    def check(cls, options, config):
        o = options
        require(o.estimator in ESTIMATORS, f"{PREFIX}.estimator={o.estimator!r} is not an estimator; "
                f"choose one of: {', '.join(ESTIMATORS)}")
        t = o.temperature
        require(isinstance(t, (int, float)) and t > 0 and math.isfinite(t),
                f"{PREFIX}.temperature={t} must be a finite number > 0 (the sigmoid's T)")
        for key in ("entropy_weight", "covariance_weight", "entropy_threshold"):
            value = o[key]
            require(value >= 0 and math.isfinite(value),
                    f"{PREFIX}.{key}={value} must be a finite number >= 0")
        require(o.entropy_warmup_steps >= 0,
                f"{PREFIX}.entropy_warmup_steps={o.entropy_warmup_steps} must be >= 0")

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        self.estimator = str(o.estimator)
        self.temperature = float(o.temperature)
        self.entropy_weight = float(o.entropy_weight)
        self.entropy_warmup_steps = int(o.entropy_warmup_steps)
        self.entropy_threshold = float(o.entropy_threshold)
        self.covariance_weight = float(o.covariance_weight)
        self.output_bias = bool(o.output_bias)

    def default_learning_rate(self):
        return 5e-4  # the paper's Adam learning rate

    # ------------------------------------------------------------------ parameters

    def param_specs(self):
        d, n = self.d, self.n
        specs = {
            "W_enc": ParamSpec((d, n), ("embed", "latent"), "encoder, one column per latent"),
            "b_enc": ParamSpec((n,), ("latent",), "encoder bias (the step fires where pre > 0)"),
            "W_dec": ParamSpec((n, d), ("latent", "embed"), "decoder, one row per latent"),
        }
        if self.output_bias:
            specs["b_dec"] = ParamSpec((d,), ("embed",), "added to the reconstruction")
        return specs

    def init_params(self, rng, sample):
        # torch.nn.Linear's init (the reference's layers): U(+-1/sqrt(fan_in)); b_dec the data mean.
        enc_rng, bias_rng, dec_rng = jax.random.split(rng, 3)
        d, n = self.d, self.n
        params = {
            "W_enc": jax.random.uniform(enc_rng, (d, n), jnp.float32, -1, 1) / math.sqrt(d),
            "b_enc": jax.random.uniform(bias_rng, (n,), jnp.float32, -1, 1) / math.sqrt(d),
            "W_dec": jax.random.uniform(dec_rng, (n, d), jnp.float32, -1, 1) / math.sqrt(n),
        }
        if self.output_bias:
            params["b_dec"] = jnp.mean(sample, axis=0)
        return params

    # ------------------------------------------------------------------ forward

    def codes(self, params, x, mesh, estimator=None):
        dtype = jnp.dtype(self.compute_dtype)
        product = jnp.dot(jax.lax.stop_gradient(x).astype(dtype), params["W_enc"].astype(dtype),
                          preferred_element_type=jnp.float32)
        pre = sharded_block(product, mesh) + params["b_enc"]
        return sharded_block(binarize(pre, estimator or self.estimator, self.temperature), mesh)

    def reconstruct(self, params, h):
        bias = params["b_dec"] if self.output_bias else jnp.zeros((self.d,), jnp.float32)
        return decode_block(h, params["W_dec"], bias, self.compute_dtype)

    def entropy_on(self, step):
        return (step >= self.entropy_warmup_steps).astype(jnp.float32)

    def loss(self, params, state, batch, ctx):
        h = self.codes(params, batch, ctx.mesh)
        nmse = normalized_mse(batch, self.reconstruct(params, h))
        entropy = entropy_bits(h, ctx.mesh)
        counted = jnp.where(entropy < self.entropy_threshold, 0.0, entropy)
        entropy_loss = self.entropy_weight * self.entropy_on(ctx.step) * counted
        loss = nmse + entropy_loss
        metrics = {"nmse": nmse, "l0": jnp.mean(jnp.sum(h, axis=1)), "entropy_bits": entropy,
                   "entropy_loss": entropy_loss}
        if self.covariance_weight:
            covariance = covariance_sum(h, ctx.mesh)
            metrics["covariance"] = covariance
            loss = loss + self.covariance_weight * covariance
        return loss, LossOutput(metrics=metrics, fire_counts=dense_fire_counts(h, self.fire_threshold))

    # ------------------------------------------------------------------ accounting / export

    def flops_per_step(self, batch_size: int) -> float:
        d, n = self.d, self.n
        per_token = 2 * d * n + 2 * n * d + 2 * n * d * 2 + 2 * d * n + 12 * n  # enc, dec, backward
        covariance = 6 * batch_size * n * n if self.covariance_weight else 0  # see covariance_ring
        optimizer = 2 * n * d * 10  # Adam on W_enc and W_dec (elementwise)
        return float(batch_size * per_token + covariance + optimizer)

    def encode(self, params, x, mesh):
        return DenseCodes(self.codes(params, x, mesh))

    def decode(self, params, codes, mesh):
        return self.reconstruct(params, sharded_block(codes.values, mesh))

    def activation(self):
        decode = "x_hat = h @ W_dec + b_dec" if self.output_bias else "x_hat = h @ W_dec"
        return {"kind": "binary", "postact": "step",
                "encode": "h = 1[x @ W_enc + b_enc > 0]", "decode": decode}

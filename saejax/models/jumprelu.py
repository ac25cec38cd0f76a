"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"), latent-sharded by XLA's partitioner.

pre = (x - b_dec) @ W_enc + b_enc;  z = pre * H(pre - theta);  x_hat = z @ W_dec + b_dec,
theta = exp(log_threshold), one per latent.
Loss: nmse(x, x_hat) + lambda(step) * L0,  L0 = mean over tokens of sum_i H(pre_i - theta_i).

H has no useful derivative, so theta learns through straight-through pseudo-derivatives
with a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
  d/dtheta JumpReLU(pre) = -(theta/eps) K((pre - theta)/eps),  d/dpre JumpReLU(pre) = H(pre - theta);
  d/dtheta H(pre - theta) = -(1/eps) K((pre - theta)/eps),       d/dpre H(pre - theta) = 0.

Units of lambda: the loss is nmse (the batch's squared error over its variance), and L0 a
per-token count, so a latent stays on for a token when it removes more than lambda times the
batch's mean per-token variance (inputs are normalised to E||x||^2 = d, so theta and eps
are in the units of pre-activations of order 1). lambda rises linearly over its warm-up.

Defaults: the paper's theta = eps = 0.001 assume long runs; Adam moves log theta by about
lr per step, so a 1,500-step run cannot climb from 0.001 to thresholds of order 0.5. We
start at theta = 0.3 with eps = 0.1 (enough pre-activations in the window for a usable
gradient) and lambda = 0.01, which reaches an L0 of about 28 on the synthetic default.

With `target_l0` set, lambda is family state: after each step (once the warm-up is over)
it is multiplied by exp(rate * clip((L0 - target) / target, -1, 1)), so it rises while
the batch L0 is above the target and falls while it is below.

Decoder rows are kept at unit norm (the L0 penalty does not see their scale, so this only
removes the z-versus-W_dec scale degeneracy and keeps theta in input units).
Everything is plain jnp under jit: the (B, n) arrays are pinned to ("batch", "latent") and
XLA partitions the matmuls; only (B, d) partial sums and (n,) reductions cross devices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from saejax.models.base import (
    DenseCodes,
    LossOutput,
    ParamSpec,
    SAEFamily,
    dense_fire_counts,
    normalized_mse,
    remove_parallel_component,
    require,
    unit_rows,
)
from saejax.ops.geometric_median import geometric_median
from saejax.sharding import named

PREFIX = "sae.jumprelu"


# ---------------------------------------------------------------------------- straight-through ops


def rectangle(u: jax.Array) -> jax.Array:
    """K(u) = 1[|u| < 1/2]."""
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _jump_relu(pre, threshold, bandwidth):
    return pre * (pre > threshold).astype(pre.dtype)


def _jump_relu_fwd(pre, threshold, bandwidth):
    return _jump_relu(pre, threshold, bandwidth), (pre, threshold)


def _jump_relu_bwd(bandwidth, residuals, g):
    pre, threshold = residuals
    d_pre = (pre > threshold).astype(pre.dtype)
    d_threshold = -(threshold / bandwidth) * rectangle((pre - threshold) / bandwidth)
    return g * d_pre, g * d_threshold


_jump_relu.defvjp(_jump_relu_fwd, _jump_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _step(pre, threshold, bandwidth):
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, bandwidth):
    return _step(pre, threshold, bandwidth), (pre, threshold)


def _step_bwd(bandwidth, residuals, g):
    pre, threshold = residuals
    d_threshold = -(1.0 / bandwidth) * rectangle((pre - threshold) / bandwidth)
    return jnp.zeros_like(pre), g * d_threshold


_step.defvjp(_step_fwd, _step_bwd)


def jump_relu(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """pre * H(pre - threshold), elementwise; threshold broadcasts (its cotangent is summed back)."""
    return _jump_relu(pre, jnp.broadcast_to(threshold, pre.shape), float(bandwidth))


def heaviside(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(pre - threshold) with the rectangle-kernel pseudo-derivative for threshold."""
    return _step(pre, jnp.broadcast_to(threshold, pre.shape), float(bandwidth))


def warmup_factor(step: jax.Array, warmup_steps: int) -> jax.Array:
    """Linear ramp 1/w, 2/w, ..., 1 over the first w steps (1 from the start when w = 0)."""
    if warmup_steps == 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum((step.astype(jnp.float32) + 1.0) / warmup_steps, 1.0)


# ---------------------------------------------------------------------------- the family


class JumpReLU(SAEFamily):
    name = "jumprelu"
    sparsity_key = "l0_coef"
    has_k = False
    decoder_linear_in_codes = True
    decoder_bias = "b_dec"

    @classmethod
    def defaults(cls):
        g = ml_collections.ConfigDict()
        g.l0_coef = 1e-2  # lambda: nmse paid per active latent per token (the start value with target_l0)
        g.coef_warmup_steps = config_dict.placeholder(int)  # lambda's linear warm-up; unset: the fraction
        g.coef_warmup_fraction = 0.1  # of train.steps, used when coef_warmup_steps is unset
        g.bandwidth = 0.1  # eps of the rectangle kernel, in pre-activation units
        g.init_threshold = 0.3  # theta at step 0, in pre-activation units (see the module docstring)
        g.target_l0 = config_dict.placeholder(float)  # set: adapt lambda toward this L0
        g.target_rate = 0.01  # the most lambda's log changes per step toward target_l0
        return g

    @classmethod
    def check(cls, options, config):
        n = config.sae.n
        o = options
        require(o.l0_coef >= 0 and math.isfinite(o.l0_coef),
                f"{PREFIX}.l0_coef={o.l0_coef} must be a finite number >= 0")
        require(o.coef_warmup_steps is None or o.coef_warmup_steps >= 0,
                f"{PREFIX}.coef_warmup_steps={o.coef_warmup_steps} must be >= 0 (or unset)")
        require(0 <= o.coef_warmup_fraction <= 1,
                f"{PREFIX}.coef_warmup_fraction={o.coef_warmup_fraction} must be in [0, 1]")
        require(o.bandwidth > 0 and math.isfinite(o.bandwidth),
                f"{PREFIX}.bandwidth={o.bandwidth} must be > 0 (the kernel width eps)")
        require(o.init_threshold > 0 and math.isfinite(o.init_threshold),
                f"{PREFIX}.init_threshold={o.init_threshold} must be > 0 (theta is log-parameterised)")
        if o.target_l0 is not None:
            require(0 < o.target_l0 <= n, f"{PREFIX}.target_l0={o.target_l0} must be in (0, sae.n={n}]")
            require(o.l0_coef > 0, f"{PREFIX}.l0_coef={o.l0_coef} must be > 0 with target_l0 "
                    "(it is the coefficient the target_l0 controller starts from)")
        require(0 < o.target_rate <= 1, f"{PREFIX}.target_rate={o.target_rate} must be in (0, 1]")

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        self.l0_coef = float(o.l0_coef)
        self.bandwidth = float(o.bandwidth)
        self.init_threshold = float(o.init_threshold)
        self.target_l0 = None if o.target_l0 is None else float(o.target_l0)
        self.target_rate = float(o.target_rate)
        steps = o.coef_warmup_steps
        fraction_steps = int(o.coef_warmup_fraction * config.train.steps)
        self.warmup_steps = int(steps) if steps is not None else fraction_steps

    def sparsity_control(self):
        if self.target_l0 is not None:
            return {"name": "target_l0", "value": self.target_l0, "is_k": False}
        return super().sparsity_control()

    def describe(self):
        control = self.sparsity_control()
        return f"{self.name} SAE d={self.d} n={self.n:,} {control['name']}={control['value']}"

    # ------------------------------------------------------------------ params and state

    def param_specs(self):
        d, n = self.d, self.n
        return {
            "W_enc": ParamSpec((d, n), ("embed", "latent"), "encoder, one column per latent"),
            "b_enc": ParamSpec((n,), ("latent",), "encoder bias"),
            "log_threshold": ParamSpec((n,), ("latent",), "log of the per-latent threshold theta"),
            "W_dec": ParamSpec((n, d), ("latent", "embed"), "decoder, one unit-norm row per latent"),
            "b_dec": ParamSpec((d,), ("embed",), "subtracted from x before encoding, added to the output"),
        }

    def init_params(self, rng, sample):
        w_dec = unit_rows(jax.random.normal(rng, (self.n, self.d), jnp.float32))
        return {
            "W_enc": w_dec.T,  # tied init, untied training
            "b_enc": jnp.zeros((self.n,), jnp.float32),
            "log_threshold": jnp.full((self.n,), math.log(self.init_threshold), jnp.float32),
            "W_dec": w_dec,
            "b_dec": geometric_median(sample),
        }

    def state_specs(self):
        if self.target_l0 is None:
            return {}
        return {"l0_coef": ParamSpec((), (), "the penalty coefficient adapted toward target_l0")}

    def init_state(self, params, sample):
        if self.target_l0 is None:
            return {}
        return {"l0_coef": jnp.asarray(self.l0_coef, jnp.float32)}

    def project_gradients(self, grads, params):
        return {**grads, "W_dec": remove_parallel_component(grads["W_dec"], params["W_dec"])}

    def apply_constraints(self, params):
        return {**params, "W_dec": unit_rows(params["W_dec"])}

    # ------------------------------------------------------------------ forward

    def pre_activations(self, params, x, mesh):
        """(B, n) pre-activations, pinned batch x latent so no device holds (or gathers) all of them."""
        dtype = jnp.dtype(self.compute_dtype)
        pre = jnp.dot((x - params["b_dec"]).astype(dtype), params["W_enc"].astype(dtype),
                      preferred_element_type=jnp.float32) + params["b_enc"]
        return jax.lax.with_sharding_constraint(pre, named(mesh, ("batch", "latent")))

    def decode_dense(self, codes, w_dec, b_dec):
        dtype = jnp.dtype(self.compute_dtype)
        return jnp.dot(codes.astype(dtype), w_dec.astype(dtype), preferred_element_type=jnp.float32) + b_dec

    def gate(self, values):
        """A kept latent's value is its pre-activation (see SAEFamily.gate)."""
        return values

    def jump(self, pre, threshold):
        """Training codes: gate(pre) * H(pre - theta), straight-through (pre * H here)."""
        return jump_relu(pre, threshold, self.bandwidth)

    def next_coef(self, coef, l0, step):
        """target_l0's controller: lambda * exp(rate * clip(relative L0 error, -1, 1)), after warm-up."""
        error = jnp.clip((l0 - self.target_l0) / self.target_l0, -1.0, 1.0)
        adapted = coef * jnp.exp(self.target_rate * error)
        return jnp.where(step + 1 >= self.warmup_steps, adapted, coef)

    def loss(self, params, state, batch, ctx):
        threshold = jnp.exp(params["log_threshold"])
        pre = self.pre_activations(params, batch, ctx.mesh)
        codes = self.jump(pre, threshold)
        recon = self.decode_dense(codes, params["W_dec"], params["b_dec"])
        nmse = normalized_mse(batch, recon)
        l0 = jnp.mean(jnp.sum(heaviside(pre, threshold, self.bandwidth), axis=1))

        base_coef = state["l0_coef"] if self.target_l0 is not None else jnp.asarray(self.l0_coef, jnp.float32)
        coef = warmup_factor(ctx.step, self.warmup_steps) * base_coef
        l0_loss = coef * l0
        new_state = {}
        if self.target_l0 is not None:
            new_state["l0_coef"] = self.next_coef(base_coef, jax.lax.stop_gradient(l0), ctx.step)
        metrics = {"nmse": nmse, "l0": jax.lax.stop_gradient(l0), "l0_loss": l0_loss, "l0_coef": coef}
        counts = dense_fire_counts(codes, self.fire_threshold)
        return nmse + l0_loss, LossOutput(metrics=metrics, fire_counts=counts, state=new_state)

    # ------------------------------------------------------------------ accounting / export

    def flops_per_step(self, batch_size: int) -> float:
        d, n = self.d, self.n
        per_token = (
            2 * d * n  # encoder matmul
            + 2 * n * d  # dense decode
            + 2 * n * d * 2  # decoder backward: code and W_dec gradients
            + 2 * d * n * 2  # encoder backward: W_enc and b_dec gradients
            + 12 * n  # bias, threshold compare, the two straight-through kernels (elementwise)
        )
        optimizer = 2 * n * d * 12  # gradient projection, Adam and renormalisation (elementwise)
        return float(batch_size * per_token + optimizer)

    # ------------------------------------------------------------------ inference

    def inference_params(self, params, state):
        inference = {name: params[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        inference["threshold"] = jnp.exp(params["log_threshold"])
        return inference

    def inference_specs(self):
        specs = {name: spec for name, spec in self.param_specs().items() if name != "log_threshold"}
        specs["threshold"] = ParamSpec((self.n,), ("latent",), "per-latent threshold theta")
        return specs

    def encode(self, params, x, mesh):
        pre = self.pre_activations(params, x, mesh)
        return DenseCodes(jnp.where(pre > params["threshold"], self.gate(pre), 0.0))

    def decode(self, params, codes, mesh):
        return self.decode_dense(codes.values, params["W_dec"], params["b_dec"])

    def activation(self):
        return {"kind": "jumprelu", "threshold": "threshold", "postact": "jumprelu",
                "encode": "z = pre * (pre > threshold), pre = (x - b_dec) @ W_enc + b_enc",
                "decode": "x_hat = z @ W_dec + b_dec"}

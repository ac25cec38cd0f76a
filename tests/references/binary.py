"""Binary autoencoder (Cho et al.): the step's straight-through slope as a zero-valued term.

The sigmoid estimator is used here (its slope depends on the pre-activation only, so it can be
written as `stop_gradient(value) + slope * (t - stop_gradient(t))`); sign and sign_s have their
own gradient tests in tests/test_family_binary.py. The covariance is jnp.cov's dense n x n,
its |.| differentiated as torch does.
"""

import jax
import jax.numpy as jnp

OVERRIDES = {
    "sae.family": "binary",
    "sae.binary.estimator": "sigmoid",
    "sae.binary.temperature": 0.5,
    "sae.binary.entropy_weight": 1e-3,
    "sae.binary.entropy_warmup_steps": 3,  # on from step 3: the first step a resume at 3 retakes
    "sae.binary.covariance_weight": 1e-4,
}
RECOVERY = 0.38  # measured 0.405 from the defaults: about random directions; BAE is not sparse

L0_RANGE = (64, 960)  # measured 482 of n = 1024 from the defaults: binary codes fire on about half


def torch_abs(t):
    """|t| with torch's derivative sign(t), 0 at 0 (jnp.abs's is 1 there). Covariances of 0/1
    codes are often exactly 0 (B * n_11 = n_1 * n_1'), so the choice shows."""
    return t * jax.lax.stop_gradient(jnp.sign(t))


def reference(family, params, state, x, step, dead):
    pre = x @ params["W_enc"] + params["b_enc"]
    fired = (pre > 0).astype(jnp.float32)
    s = jax.nn.sigmoid(pre / family.temperature)
    slope = jax.lax.stop_gradient(s * (1 - s) / family.temperature)
    h = jax.lax.stop_gradient(fired) + slope * (pre - jax.lax.stop_gradient(pre))

    recon = h @ params["W_dec"] + params.get("b_dec", 0.0)
    nmse = jnp.sum((x - recon) ** 2) / jnp.sum((x - x.mean(0)) ** 2)
    p = h.mean(0)
    entropy = -jnp.sum(p * jnp.log2(p + 1e-10) + (1 - p) * jnp.log2(1 - p + 1e-10))
    entropy = jnp.where(entropy < family.entropy_threshold, 0.0, entropy)
    on = (step >= family.entropy_warmup_steps).astype(jnp.float32)
    cov = jnp.cov(h.T)
    covariance = jnp.sum(torch_abs(cov)) - jnp.sum(torch_abs(jnp.diag(cov)))
    loss = nmse + family.entropy_weight * on * entropy + family.covariance_weight * covariance
    return {"loss": loss, "state": {}, "fire_counts": (fired > family.fire_threshold).sum(0)}

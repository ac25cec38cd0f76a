"""Gated SAE: gate and magnitude paths written out with W_mag formed explicitly, on one device."""

import jax
import jax.numpy as jnp
from jax import lax

from references.relu import warmed_up

OVERRIDES = {"sae.family": "gated", "sae.gated.l1_warmup_steps": 2, "sae.gated.aux_coef": 0.5}
RECOVERY = 0.88


def perturb(params, state, rng):
    keys = jax.random.split(rng, 4)
    n = params["W_dec"].shape[0]
    scale = jax.random.uniform(keys[0], (n, 1), minval=0.5, maxval=2.0)
    return {**params, "W_dec": params["W_dec"] * scale,
            "b_gate": 0.05 * jax.random.normal(keys[1], (n,)),
            "r_mag": 0.3 * jax.random.normal(keys[2], (n,)),
            "b_mag": 0.05 * jax.random.normal(keys[3], (n,))}, state


def nmse(x, recon):
    return jnp.sum((x - recon) ** 2) / jnp.sum((x - x.mean(0)) ** 2)


def reference(family, params, state, x, step, dead):
    xc = x - params["b_dec"]
    pi = xc @ params["W_enc"] + params["b_gate"]
    w_mag = params["W_enc"] * jnp.exp(params["r_mag"])[None, :]
    mag = xc @ w_mag + params["b_mag"]
    z = lax.stop_gradient((pi > 0).astype(x.dtype)) * jnp.maximum(mag, 0.0)
    recon = z @ params["W_dec"] + params["b_dec"]
    gate = jnp.maximum(pi, 0.0)
    penalty = jnp.sum(gate * jnp.linalg.norm(params["W_dec"], axis=1)[None, :]) / jnp.sum((x - x.mean(0)) ** 2)
    aux = nmse(x, gate @ lax.stop_gradient(params["W_dec"]) + lax.stop_gradient(params["b_dec"]))
    coef = warmed_up(family.l1_coef, step, family.warmup_steps)
    loss = nmse(x, recon) + coef * penalty + family.aux_coef * aux
    return {"loss": loss, "state": state, "fire_counts": (z > family.fire_threshold).sum(0)}

"""ReLU + decoder-norm weighted L1: dense codes, plain jnp, the penalty on the nmse's scale."""

import jax
import jax.numpy as jnp

OVERRIDES = {"sae.family": "relu", "sae.relu.l1_warmup_steps": 2}
RECOVERY = 0.9


def perturb(params, state, rng):
    bias_rng, norm_rng = jax.random.split(rng)
    # Decoder rows of different norms, so the weighting of the L1 by ||w_dec,i|| is exercised.
    scale = jax.random.uniform(norm_rng, (params["W_dec"].shape[0], 1), minval=0.5, maxval=2.0)
    return {**params, "W_dec": params["W_dec"] * scale,
            "b_enc": 0.1 * jax.random.normal(bias_rng, params["b_enc"].shape)}, state


def warmed_up(coef, step, warmup_steps):
    return coef * min(1.0, int(step) / warmup_steps) if warmup_steps else coef


def reference(family, params, state, x, step, dead):
    pre = (x - params["b_pre"]) @ params["W_enc"] + params["b_enc"]
    z = jnp.maximum(pre, 0.0)
    recon = z @ params["W_dec"] + params["b_pre"]
    spread = jnp.sum((x - x.mean(0)) ** 2)
    penalty = jnp.sum(z * jnp.linalg.norm(params["W_dec"], axis=1)[None, :])
    coef = warmed_up(family.l1_coef, step, family.warmup_steps)
    loss = (jnp.sum((x - recon) ** 2) + coef * penalty) / spread
    return {"loss": loss, "state": state, "fire_counts": (z > family.fire_threshold).sum(0)}

"""ProLU: z = m * 1[m > 0, m + b > 0] with the bias's straight-through gradient written by stop_gradient."""

import jax
import jax.numpy as jnp
from jax import lax

from references.relu import warmed_up

OVERRIDES = {"sae.family": "prolu", "sae.prolu.l1_warmup_steps": 2, "sae.prolu.ste": "ste"}
RECOVERY = 0.85


def perturb(params, state, rng):
    bias_rng, norm_rng = jax.random.split(rng)
    scale = jax.random.uniform(norm_rng, (params["W_dec"].shape[0], 1), minval=0.5, maxval=2.0)
    # Biases of both signs: some latents with m > 0 are gated off, positive ones change nothing.
    return {**params, "W_dec": params["W_dec"] * scale,
            "b_enc": 0.05 * jax.random.normal(bias_rng, params["b_enc"].shape)}, state


def prolu(m, b, ste):
    """Forward m * G; backward of "ste": d/dm = G (1 + m), d/db = G m; of "relu": G and G."""
    gate = lax.stop_gradient(((m > 0) & (m + b > 0)).astype(m.dtype))
    if ste == "ste":
        shifted = m + b
        return gate * m + gate * lax.stop_gradient(m) * (shifted - lax.stop_gradient(shifted))
    return gate * m + gate * (b - lax.stop_gradient(b))


def reference(family, params, state, x, step, dead):
    m = (x - params["b_pre"]) @ params["W_enc"]
    z = prolu(m, params["b_enc"], family.options.ste)
    recon = z @ params["W_dec"] + params["b_pre"]
    spread = jnp.sum((x - x.mean(0)) ** 2)
    penalty = jnp.sum(z * jnp.linalg.norm(params["W_dec"], axis=1)[None, :])
    coef = warmed_up(family.l1_coef, step, family.warmup_steps)
    loss = (jnp.sum((x - recon) ** 2) + coef * penalty) / spread
    return {"loss": loss, "state": state, "fire_counts": (z > family.fire_threshold).sum(0)}

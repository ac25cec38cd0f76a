"""BatchTopK (Bussmann et al. 2024): the B·k largest entries of the dense (B, n) batch by lax.top_k."""

import jax
import jax.numpy as jnp

# small_config sets TopK's k and k_aux; they go back to TopK's defaults (an inactive group must be).
OVERRIDES = {"sae.family": "batchtopk", "sae.batchtopk.k": 8, "sae.batchtopk.k_aux": 16,
             "sae.batchtopk.threshold_start_step": 0}
RECOVERY = 0.55  # measured 0.583 from the defaults (1500 steps, k=8); TopK reaches more here


def perturb(params, state, rng):
    params = {**params, "b_enc": 0.1 * jax.random.normal(rng, params["b_enc"].shape)}
    return params, {"threshold": jnp.full_like(state["threshold"], 0.5)}  # an estimate to move by EMA


def nmse(a, r):
    return jnp.sum((a - r) ** 2) / jnp.sum((a - a.mean(0)) ** 2)


def batch_codes(pre, k):
    """ReLU of the B·k largest pre-activations of the batch (ties at the B·k-th value all kept)."""
    tau = jax.lax.top_k(pre.reshape(-1), pre.shape[0] * k)[0][-1]
    return jnp.where(pre >= tau, jax.nn.relu(pre), 0.0)


def auxk_loss(params, pre, residual, dead, k_aux):
    rows = jnp.arange(pre.shape[0])[:, None]
    values, indices = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), k_aux)
    aux_codes = jnp.zeros_like(pre).at[rows, indices].set(jax.nn.relu(values))
    return jnp.where(dead.any(), nmse(residual, aux_codes @ params["W_dec"]), 0.0)


def threshold_update(family, state, z, step):
    smallest = jnp.min(jnp.where(z > 0, z, jnp.inf), axis=0)  # per latent
    observed = smallest if family.per_latent else jnp.min(smallest)
    old = state["threshold"]
    new = jnp.where(jnp.isinf(old), observed,
                    family.threshold_decay * old + (1 - family.threshold_decay) * observed)
    keep = (step < family.threshold_start_step) | ~jnp.isfinite(observed)
    return {"threshold": jnp.where(keep, old, new)}


def prefix_loss(family, params, x, z, dead, pre, prefixes, weights):
    """Weighted nmse of each prefix's reconstruction plus AuxK on the full one."""
    columns = jnp.arange(z.shape[1])
    recons = [jnp.where(columns < m, z, 0.0) @ params["W_dec"] + params["b_pre"] for m in prefixes]
    loss = sum(w * nmse(x, r) for w, r in zip(weights, recons))
    residual = jax.lax.stop_gradient(x - recons[-1])
    return loss + family.auxk_coef * auxk_loss(params, pre, residual, dead, family.k_aux)


def reference(family, params, state, x, step, dead):
    pre = (x - params["b_pre"]) @ params["W_enc"] + params["b_enc"]
    z = batch_codes(pre, family.k)
    loss = prefix_loss(family, params, x, z, dead, pre, (family.n,), (1.0,))
    return {"loss": loss, "state": threshold_update(family, state, z, step),
            "fire_counts": jnp.sum(z > family.fire_threshold, axis=0, dtype=jnp.int32)}

"""TopK (Gao et al.): dense codes from lax.top_k over all latents."""

import jax
import jax.numpy as jnp

from helpers import dense_reference_loss

OVERRIDES = {"sae.family": "topk", "sae.topk.multi_topk": True}
RECOVERY = 0.9


def perturb(params, state, rng):
    return {**params, "b_enc": 0.1 * jax.random.normal(rng, params["b_enc"].shape)}, state


def reference(family, params, state, x, step, dead):
    loss = dense_reference_loss(params, x, dead, family.k, family.k_aux, family.auxk_coef,
                                family.k_multi if family.multi_coef else None, family.multi_coef)
    pre = (x - params["b_pre"]) @ params["W_enc"] + params["b_enc"]
    values, indices = jax.lax.top_k(pre, family.k)
    fired = jnp.zeros(pre.shape, jnp.int32).at[jnp.arange(x.shape[0])[:, None], indices].set(values > 0)
    return {"loss": loss, "state": state, "fire_counts": fired.sum(0)}

"""Matryoshka BatchTopK (Bussmann et al. 2025): BatchTopK's dense codes, one reconstruction per prefix."""

import jax.numpy as jnp

from references.batchtopk import batch_codes, perturb, prefix_loss, threshold_update

# Prefixes that cut through model shards (32 latents each on 1x8).
OVERRIDES = {"sae.family": "matryoshka", "sae.matryoshka.k": 8, "sae.matryoshka.k_aux": 16,
             "sae.matryoshka.threshold_start_step": 0, "sae.matryoshka.prefixes": "10,50,100,256"}
RECOVERY = 0.5  # measured 0.540 from the defaults (1500 steps, k=8, prefixes 16,64,256,1024)
__all__ = ["OVERRIDES", "RECOVERY", "perturb", "reference"]


def reference(family, params, state, x, step, dead):
    pre = (x - params["b_pre"]) @ params["W_enc"] + params["b_enc"]
    z = batch_codes(pre, family.k)
    prefixes = (10, 50, 100, 256)
    assert family.prefixes == prefixes
    loss = prefix_loss(family, params, x, z, dead, pre, prefixes, [1 / len(prefixes)] * len(prefixes))
    return {"loss": loss, "state": threshold_update(family, state, z, step),
            "fire_counts": jnp.sum(z > family.fire_threshold, axis=0, dtype=jnp.int32)}

"""Inference through any family's `encode`/`decode`: held-out metrics and code statistics.

Evaluation, export checks and (later) downstream metrics all go through
these, so they work for every family the way it infers (BatchTopK with its
threshold, TopK with its top-k).
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from saejax.models.base import Codes, DenseCodes, SparseCodes, normalized_mse


def code_fire_counts(codes: Codes, n: int, threshold: float) -> jax.Array:
    """(n,) int32: on how many tokens each latent's code is > threshold."""
    if isinstance(codes, DenseCodes):
        return jnp.sum(codes.values > threshold, axis=0, dtype=jnp.int32)
    hits = (codes.values > threshold).astype(jnp.int32)
    return jnp.zeros((n,), jnp.int32).at[codes.indices.reshape(-1)].add(hits.reshape(-1))


def active_per_token(codes: Codes) -> jax.Array:
    """(B,) number of non-zero codes of each token (its L0)."""
    return jnp.sum(codes.values != 0, axis=-1, dtype=jnp.int32)


def make_eval_step(family, mesh):
    """jit(params, batch) -> {nmse, l0, fire_counts} through the family's inference encode/decode."""

    def step(params, batch):
        codes = family.encode(params, batch, mesh)
        recon = family.decode(params, codes, mesh)
        return {
            "nmse": normalized_mse(batch, recon),
            "l0": jnp.mean(active_per_token(codes).astype(jnp.float32)),
            "fire_counts": code_fire_counts(codes, family.n, family.fire_threshold),
        }

    return jax.jit(step)


def reconstruction_metrics(family, params, batches: Iterable[jax.Array], mesh,
                           dense_threshold: float) -> dict[str, float]:
    """Held-out nmse, explained variance, L0, and dead/dense fractions over the given batches.

    Dead here means: never fired on these tokens; dense: fired on more than
    `dense_threshold` of them.
    """
    step = make_eval_step(family, mesh)
    nmse, l0, tokens, counts, count = 0.0, 0.0, 0, np.zeros(family.n, np.int64), 0
    for batch in batches:
        out = jax.device_get(step(params, batch))
        nmse, l0, count = nmse + float(out["nmse"]), l0 + float(out["l0"]), count + 1
        counts += np.asarray(out["fire_counts"], np.int64)
        tokens += int(batch.shape[0])
    if not count:
        return {}
    return {
        "nmse": nmse / count,
        "explained_variance": 1.0 - nmse / count,
        "l0": l0 / count,
        "dead_fraction": float(np.mean(counts == 0)),
        "dense_fraction": float(np.mean(counts > dense_threshold * tokens)),
        "tokens": tokens,
    }

"""Geometric median (Weiszfeld's algorithm), used to initialise the SAE's b_pre."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def geometric_median(points: jax.Array, iterations: int = 100, tol: float = 1e-6) -> jax.Array:
    """argmin_m sum_i ||x_i - m||, starting from the mean.

    Stops after `iterations` or when a step moves m by less than `tol` relative
    to its norm. Distances are floored at 1e-8 so a point coinciding with the
    estimate does not divide by zero.
    """
    points = points.astype(jnp.float32)

    def step(state):
        median, _, i = state
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - median, axis=1), 1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        moved = jnp.linalg.norm(new - median) / jnp.maximum(jnp.linalg.norm(median), 1e-8)
        return new, moved, i + 1

    def not_done(state):
        _, moved, i = state
        return (i < iterations) & (moved > tol)

    init = (points.mean(0), jnp.array(jnp.inf, jnp.float32), jnp.array(0))
    median, _, _ = jax.lax.while_loop(not_done, step, init)
    return median

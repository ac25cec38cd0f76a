"""Exact top-k along the last axis.

XLA's CPU top-k costs about as much as a fifth of the encoder matmul at
n=16384. Taking the maximum of each group of 32 latents first, the k largest
values are known to lie in the k groups with the largest maxima (a group whose
maximum is below the k-th largest value cannot hold any of the top k), so an
exact top-k needs only two small top-k calls: 2x faster on CPU. On GPU/TPU
`lax.top_k` is used as is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP_SIZE = 32


def _grouped_applies(n: int, k: int) -> bool:
    return n % GROUP_SIZE == 0 and n // GROUP_SIZE >= 4 * k


def grouped_top_k(x: jax.Array, k: int, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Exact top-k of `x + bias` through group maxima; same values as `lax.top_k`, sorted descending."""
    *lead, n = x.shape
    groups = x.reshape(*lead, n // GROUP_SIZE, GROUP_SIZE)
    bias_groups = jnp.zeros((n // GROUP_SIZE, GROUP_SIZE), x.dtype) if bias is None else bias.reshape(-1, GROUP_SIZE)
    # The bias is added inside the reduction and again on the few candidates, so
    # the full (B, n) sum is never written to memory.
    _, top_groups = jax.lax.top_k((groups + bias_groups).max(axis=-1), k)
    candidates = jnp.take_along_axis(groups, top_groups[..., None], axis=-2) + bias_groups[top_groups]
    values, pos = jax.lax.top_k(candidates.reshape(*lead, k * GROUP_SIZE), k)
    group_of_pos = jnp.take_along_axis(top_groups, pos // GROUP_SIZE, axis=-1)
    return values, (group_of_pos * GROUP_SIZE + pos % GROUP_SIZE).astype(jnp.int32)


def top_k(x: jax.Array, k: int, impl: str = "auto", bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-k values and int32 indices of `x + bias` along the last axis, sorted descending.

    impl: "lax" (XLA's top-k), "grouped" (group-maxima method), or "auto"
    (grouped on CPU when it applies, lax elsewhere).
    """
    n = x.shape[-1]
    if impl == "auto":
        impl = "grouped" if jax.default_backend() == "cpu" and _grouped_applies(n, k) else "lax"
    if impl == "grouped" and _grouped_applies(n, k):
        return grouped_top_k(x, k, bias)
    if impl not in ("lax", "grouped"):
        raise ValueError(f"unknown top-k implementation {impl!r}; use 'auto', 'lax' or 'grouped'")
    values, indices = jax.lax.top_k(x if bias is None else x + bias, k)
    return values, indices.astype(jnp.int32)

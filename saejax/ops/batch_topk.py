"""The B·k-th largest pre-activation of a whole sharded batch, without gathering it.

BatchTopK keeps the B·k largest pre-activations of the global (B, n) batch,
which is split over the data axis (tokens) and the model axis (latents).
Nothing of size B x n moves between devices: the threshold tau (the B·k-th
largest value) is found by bisection on the bits of the floats, 32 rounds
each exchanging one int32 count (a psum over both mesh axes), which gives the
exact value, not an approximation.

Floats map to uint32 keys that sort like the floats (`ordered_keys`); the
bisection builds the largest key t with #{key >= t} >= B·k bit by bit from
the top. Every entry >= tau is kept, so ties at tau are all kept (more than
B·k entries only when the B·k-th value is repeated): the rule is the same on
every mesh and needs no global order over (token, latent).

Callers run this on per-token candidates (each device's top-C latents of
each token) and check afterwards that no row had all C candidates >= tau
(`candidates_suffice`); otherwise a latent left out of the candidates could
be >= tau, and the caller recomputes tau over its full local block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sharding import DATA_AXIS, MODEL_AXIS

ALL_AXES = (DATA_AXIS, MODEL_AXIS)
_SIGN = np.uint32(0x80000000)  # numpy: a jnp constant here would start the backend at import


def ordered_keys(values: jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 values (negative floats: all bits flipped)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits & _SIGN, ~bits, bits | _SIGN)


def keys_to_values(keys: jax.Array) -> jax.Array:
    """Inverse of `ordered_keys`."""
    bits = jnp.where(keys & _SIGN, keys & ~_SIGN, ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def kth_largest(values, count: int, axes=ALL_AXES) -> jax.Array:
    """The `count`-th largest entry of `values` (an array or a tuple of arrays) over all devices
    of `axes`, exactly; the same on every device.

    Each device's count is capped at `count` before the psum, so the sum fits
    in int32 however many entries there are.
    """
    keys = [ordered_keys(v) for v in (values if isinstance(values, tuple) else (values,))]

    def round_(bit, best):
        trial = best | (jnp.uint32(1) << (31 - bit).astype(jnp.uint32))
        local = sum(jnp.minimum(jnp.sum(k >= trial, dtype=jnp.int32), count) for k in keys)
        local = jnp.minimum(local, count)
        enough = jax.lax.psum(local, axes) >= count
        return jnp.where(enough, trial, best)

    best = jax.lax.fori_loop(0, 32, round_, jnp.zeros((), jnp.uint32))
    return keys_to_values(best)


def candidates_suffice(smallest_candidate: jax.Array, tau: jax.Array, axes=ALL_AXES) -> jax.Array:
    """True on every device when no row's smallest candidate is >= tau (then tau is exact)."""
    overflow = jnp.any(smallest_candidate >= tau).astype(jnp.int32)
    return jax.lax.pmax(overflow, axes) == 0

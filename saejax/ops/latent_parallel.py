"""Exact top-k and decoding over a dictionary split across the `model` mesh axis.

These functions run inside `jax.shard_map`. Each device holds n/S latents.
Instead of gathering the (B, n) pre-activations (what `lax.top_k` on a
latent-sharded array does), each device proposes its local top-k, only those
B x k x S candidates (values and global indices) are all-gathered, every
device takes the same global top-k, decodes the survivors it owns, and the
partial reconstructions are summed with one psum of (B, d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saejax.ops import compact, vma
from saejax.ops.sparse import sparse_decode
from saejax.ops.topk import top_k
from saejax.sharding import DATA_AXIS, MODEL_AXIS

ALL_AXES = (DATA_AXIS, MODEL_AXIS)


def vary(x: jax.Array, axes=ALL_AXES) -> jax.Array:
    """Mark `x` as varying over `axes` (default: all mesh axes) before a custom-VJP kernel."""
    return vma.vary(x, axes)


def latent_offset(num_local: int) -> jax.Array:
    """Global index of this device's first latent."""
    return (jax.lax.axis_index(MODEL_AXIS) * num_local).astype(jnp.int32)


def global_top_k(local_values, global_indices, k: int, impl: str = "auto"):
    """Global top-k from per-device candidates; identical on every device of a model group."""
    all_values = jax.lax.all_gather(local_values, MODEL_AXIS, axis=1, tiled=True)
    all_indices = jax.lax.all_gather(global_indices, MODEL_AXIS, axis=1, tiled=True)
    if all_values.shape[1] == k:  # one model shard: candidates are already the answer
        return all_values, all_indices
    values, pos = top_k(all_values, k, impl)
    return values, jnp.take_along_axis(all_indices, pos, axis=1)


def own_slots(global_indices, num_local: int):
    """(local index, owned?) for each selected latent: which survivors this device decodes."""
    local = global_indices - latent_offset(num_local)
    owned = (local >= 0) & (local < num_local)
    return jnp.where(owned, local, 0), owned


def decode_owned(codes, global_indices, w_dec_local):
    """sum over the selected latents of code * decoder row, across all model shards."""
    local, owned = own_slots(global_indices, w_dec_local.shape[0])
    partial = sparse_decode(jnp.where(owned, codes, 0.0), local, w_dec_local)
    return jax.lax.psum(partial, MODEL_AXIS)


def decode_owned_block(codes, global_indices, w_dec_local, member_ids):
    """`decode_owned` for survivors drawn from a small latent set (`member_ids`): one dense matmul."""
    num_local = w_dec_local.shape[0]
    local, owned = own_slots(global_indices, num_local)
    pos, member = compact.block_positions(member_ids, local, num_local)
    block = compact.scatter_to_block(codes, pos, owned & member, member_ids.shape[0], w_dec_local)
    rows = jnp.take(w_dec_local, member_ids, axis=0, mode="fill", fill_value=0.0)
    return jax.lax.psum(block @ rows, MODEL_AXIS)


def fire_counts(codes, global_indices, num_local: int, threshold: float):
    """(num_local,) int32: on how many tokens of the global batch each of this device's latents fired."""
    local, owned = own_slots(global_indices, num_local)
    hits = (owned & (codes > threshold)).astype(jnp.int32)
    counts = jnp.zeros((num_local,), jnp.int32).at[local.reshape(-1)].add(hits.reshape(-1))
    return jax.lax.psum(counts, DATA_AXIS)

"""Sparse encoder/decoder kernels with hand-written backward passes.

A TopK SAE touches only k of n latents per token, so nothing here builds a
dense (B, n) code matrix:

* `sparse_decode` sums k gathered decoder rows per token; its backward
  gathers again for the code gradient and scatter-adds into the touched rows.
* `encode_select` runs the one dense matmul (the encoder) and the top-k; its
  backward scatter-adds into the selected encoder columns only and takes the
  `b_pre` gradient as one matrix-vector product.

The gathers and scatters loop over the k selected slots (`lax.scan`), one
(B, d) slab at a time: XLA on CPU otherwise materialises a (B, k, d) array,
which costs 7x more for the decode at d=768, k=32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from saejax.ops import compact
from saejax.ops.topk import top_k
from saejax.ops.vma import vary_like


def _over_slots(fn, init, *slot_arrays):
    """Scan `fn(carry, *columns_j)` over the k slots (last axis) of (B, k) arrays."""
    return jax.lax.scan(lambda c, xs: fn(c, *xs), init, tuple(a.T for a in slot_arrays))


def gather_sum(weights: jax.Array, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
    """out[b] = sum_j coeffs[b, j] * weights[indices[b, j]]  -> (B, d)."""
    out0 = vary_like(jnp.zeros((indices.shape[0], weights.shape[1]), weights.dtype), weights, indices, coeffs)
    out, _ = _over_slots(lambda acc, i, c: (acc + c[:, None] * weights[i], None), out0, indices, coeffs)
    return out


def gather_dot(weights: jax.Array, indices: jax.Array, vectors: jax.Array) -> jax.Array:
    """out[b, j] = weights[indices[b, j]] . vectors[b]  -> (B, k)."""
    _, cols = _over_slots(lambda c, i: (c, jnp.sum(weights[i] * vectors, axis=-1)), 0, indices)
    return cols.T


def scatter_rows(num_rows: int, indices: jax.Array, coeffs: jax.Array, rows: jax.Array) -> jax.Array:
    """out[indices[b, j]] += coeffs[b, j] * rows[b]  -> (num_rows, d)."""
    out0 = vary_like(jnp.zeros((num_rows, rows.shape[1]), rows.dtype), indices, coeffs, rows)
    out, _ = _over_slots(
        lambda acc, i, c: (acc.at[i].add(c[:, None] * rows, mode="promise_in_bounds"), None),
        out0, indices, coeffs,
    )
    return out


# --------------------------------------------------------------------------- decode


@jax.custom_vjp
def sparse_decode(coeffs: jax.Array, indices: jax.Array, w_dec: jax.Array) -> jax.Array:
    """sum_j coeffs[b, j] * w_dec[indices[b, j]]: the decoder without a dense code matrix."""
    return gather_sum(w_dec, indices, coeffs)


def _decode_fwd(coeffs, indices, w_dec):
    return gather_sum(w_dec, indices, coeffs), (coeffs, indices, w_dec)


def _decode_bwd(res, g):
    coeffs, indices, w_dec = res
    d_coeffs = gather_dot(w_dec, indices, g)
    d_w_dec = scatter_rows(w_dec.shape[0], indices, coeffs, g)
    return d_coeffs, None, d_w_dec


sparse_decode.defvjp(_decode_fwd, _decode_bwd)


# --------------------------------------------------------------------------- encode


@functools.lru_cache(maxsize=None)
def make_encode_select(k: int, k_aux: int, compute_dtype: str = "float32", topk_impl: str = "auto"):
    """Build `encode_select(x, b_pre, w_enc, b_enc, aux_mask, aux_count)`.

    Forward: pre = (x - b_pre) @ w_enc + b_enc; returns the top-k of `pre`
    (values, indices) and the top-`k_aux` of `pre` restricted to `aux_mask`
    (AuxK's dead latents; -inf elsewhere). `aux_count` is the largest number
    of masked latents on any device (the same on all of them): 0 skips AuxK
    (-inf/0 filler), a small count takes the dense-block path of
    `saejax.ops.compact`, a large one the sparse path.

    Backward: only the selected latents receive gradient. `x` is data: its
    cotangent is returned as zeros (never needed for training an SAE).
    """
    dtype = jnp.dtype(compute_dtype)

    def encoder_matmul(x, b_pre, w_enc):
        xc = x - b_pre
        return xc, jnp.dot(xc.astype(dtype), w_enc.astype(dtype), preferred_element_type=jnp.float32)

    def aux_branches(product, b_enc, aux_mask):
        n = product.shape[-1]

        def nothing():
            shape = product.shape[:-1] + (k_aux,)
            filler = jnp.full(shape, -jnp.inf, product.dtype), jnp.zeros(shape, jnp.int32)
            return tuple(vary_like(f, product, b_enc) for f in filler)

        def block_top_k(capacity):
            def select():
                ids = compact.member_ids(aux_mask, capacity)
                pre = jnp.take(product, ids, axis=1, mode="fill", fill_value=-jnp.inf)
                pre = pre + jnp.take(b_enc, ids, mode="fill", fill_value=0.0)
                if capacity <= k_aux:  # every member is selected: no top-k needed (order is irrelevant)
                    values, indices = pre, vary_like(jnp.broadcast_to(ids, pre.shape), pre)
                else:
                    values, pos = top_k(pre, k_aux, topk_impl)
                    indices = ids[pos]
                return values, jnp.where(indices < n, indices, 0)
            return select

        def masked_top_k():
            return top_k(jnp.where(aux_mask, product + b_enc, -jnp.inf), k_aux, topk_impl)

        return [nothing] + [block_top_k(c) for c in compact.capacities(k_aux, n)] + [masked_top_k]

    def forward(x, b_pre, w_enc, b_enc, aux_mask, aux_count):
        # pre = product + b_enc is never materialised: the top-k adds the bias itself.
        xc, product = encoder_matmul(x, b_pre, w_enc)
        values, indices = top_k(product, k, topk_impl, bias=b_enc)
        if k_aux:
            branch = compact.branch_index(aux_count, compact.capacities(k_aux, product.shape[-1]))
            aux_values, aux_indices = jax.lax.switch(branch, aux_branches(product, b_enc, aux_mask))
        else:
            branch = jnp.zeros((), jnp.int32)
            aux_values = jnp.zeros(product.shape[:-1] + (0,), jnp.float32)
            aux_indices = aux_values.astype(jnp.int32)
        return (values, indices, aux_values, aux_indices), (xc, w_enc, indices, aux_indices, aux_mask, branch)

    @jax.custom_vjp
    def encode_select(x, b_pre, w_enc, b_enc, aux_mask, aux_count):
        return forward(x, b_pre, w_enc, b_enc, aux_mask, aux_count)[0]

    def bwd(res, cotangents):
        xc, w_enc, indices, aux_indices, aux_mask, branch = res
        d_values, _, d_aux_values, _ = cotangents
        n = w_enc.shape[1]

        def sparse_grads(idx, g):
            # Encoder gradient built as rows of W_enc^T (contiguous scatter), transposed at the end.
            return scatter_rows(n, idx, g, xc), jax.ops.segment_sum(g.reshape(-1), idx.reshape(-1), n)

        def main_only():
            return sparse_grads(indices, d_values)

        def with_block(capacity):
            def grads():
                w_t, b = sparse_grads(indices, d_values)
                ids = compact.member_ids(aux_mask, capacity)
                pos, member = compact.block_positions(ids, aux_indices, n)
                block = compact.scatter_to_block(d_aux_values, pos, member, capacity, xc)
                w_t = w_t.at[ids].add(block.T @ xc, mode="drop")  # one (C, B) x (B, d) matmul
                return w_t, b.at[ids].add(block.sum(0), mode="drop")
            return grads

        def with_sparse_aux():
            return sparse_grads(jnp.concatenate([indices, aux_indices], axis=1),
                                jnp.concatenate([d_values, d_aux_values], axis=1))

        if k_aux:
            branches = [main_only] + [with_block(c) for c in compact.capacities(k_aux, n)] + [with_sparse_aux]
            d_w_enc_t, d_b_enc = jax.lax.switch(branch, branches)
        else:
            d_w_enc_t, d_b_enc = main_only()
        # d pre / d b_pre = -W_enc, summed over the batch first: one mat-vec.
        d_b_pre = -(w_enc @ d_b_enc)
        return jnp.zeros_like(xc), d_b_pre, d_w_enc_t.T, d_b_enc, None, None

    encode_select.defvjp(forward, bwd)
    return encode_select

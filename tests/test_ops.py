"""Kernels against reference computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.ops.geometric_median import geometric_median
from saejax.ops.sparse import gather_dot, make_encode_select, scatter_rows, sparse_decode
from saejax.ops.topk import grouped_top_k, top_k


@pytest.mark.parametrize("n,k", [(4096, 32), (1024, 8), (2048, 1)])
def test_grouped_top_k_equals_lax(n, k):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, n))
    bias = jax.random.normal(jax.random.PRNGKey(1), (n,))
    ref_values, ref_indices = jax.lax.top_k(x + bias, k)
    values, indices = grouped_top_k(x, k, bias)
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(np.sort(indices, 1), np.sort(ref_indices, 1))
    # The indices point at the values they claim.
    np.testing.assert_array_equal(jnp.take_along_axis(x + bias, indices, 1), values)


def test_top_k_falls_back_when_grouping_does_not_apply():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 100))  # 100 is not a multiple of 32
    values, indices = top_k(x, 5, impl="grouped")
    np.testing.assert_array_equal(values, jax.lax.top_k(x, 5)[0])
    assert indices.dtype == jnp.int32
    with pytest.raises(ValueError, match="unknown top-k implementation"):
        top_k(jnp.ones((2, 64)), 2, impl="fast")


def _sparse_problem(B=32, n=128, d=16, k=6, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    w = jax.random.normal(keys[0], (n, d))
    idx = jnp.argsort(jax.random.uniform(keys[1], (B, n)), axis=1)[:, :k].astype(jnp.int32)
    coeffs = jax.random.normal(keys[2], (B, k))
    g = jax.random.normal(keys[3], (B, d))
    return w, idx, coeffs, g


def _dense_codes(idx, coeffs, n):
    return jnp.zeros((idx.shape[0], n)).at[jnp.arange(idx.shape[0])[:, None], idx].add(coeffs)


def test_sparse_decode_and_its_gradients_equal_dense_matmul():
    w, idx, coeffs, g = _sparse_problem()
    dense = lambda c, w: _dense_codes(idx, c, w.shape[0]) @ w  # noqa: E731
    np.testing.assert_allclose(sparse_decode(coeffs, idx, w), dense(coeffs, w), rtol=1e-5, atol=1e-5)
    got = jax.vjp(lambda c, w: sparse_decode(c, idx, w), coeffs, w)[1](g)
    want = jax.vjp(dense, coeffs, w)[1](g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gather_and_scatter_primitives():
    w, idx, coeffs, g = _sparse_problem()
    np.testing.assert_allclose(gather_dot(w, idx, g), jnp.einsum("bkd,bd->bk", w[idx], g), rtol=1e-5, atol=1e-5)
    ref = jnp.zeros_like(w).at[idx.reshape(-1)].add((coeffs[..., None] * g[:, None, :]).reshape(-1, w.shape[1]))
    np.testing.assert_allclose(scatter_rows(w.shape[0], idx, coeffs, g), ref, rtol=1e-5, atol=1e-5)


# AuxK's path depends on how many latents are dead (saejax.ops.compact): with k_aux=12 the
# dense blocks hold 12, 48 or 192 latents; every 40th of 256 dead is 7 (block of 12, no top-k),
# every 7th is 37 (block of 48), every 3rd is 86 (block of 192); with k_aux=4 (blocks of 4, 16,
# 64) every 3rd takes the sparse path over all latents; none dead skips AuxK.
@pytest.mark.parametrize("dead_every,k_aux", [(3, 4), (3, 12), (7, 12), (40, 12), (0, 12)])
def test_encode_select_gradients_touch_only_selected_latents(dead_every, k_aux):
    any_dead = dead_every > 0
    B, d, n, k = 32, 16, 256, 8
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    x = jax.random.normal(keys[0], (B, d))
    b_pre = jax.random.normal(keys[1], (d,))
    w_enc = jax.random.normal(keys[2], (d, n))
    b_enc = jax.random.normal(keys[3], (n,))
    dead = (jnp.arange(n) % max(dead_every, 1) == 0) & any_dead
    # Weights per (token, latent), so the check does not depend on the order candidates come in.
    weight = jax.random.normal(keys[4], (B, n)), 0.5 * jax.random.normal(keys[0], (B, n))
    encode = make_encode_select(k, k_aux)

    def weighted(values, indices, w):
        return jnp.sum(jnp.where(jnp.isfinite(values), values, 0.0) * jnp.take_along_axis(w, indices, 1))

    def ours(b_pre, w_enc, b_enc):
        v, i, av, ai = encode(x, b_pre, w_enc, b_enc, dead, jnp.sum(dead))
        return weighted(v, i, weight[0]) + weighted(av, ai, weight[1])

    def reference(b_pre, w_enc, b_enc):
        pre = (x - b_pre) @ w_enc + b_enc
        total = weighted(*jax.lax.top_k(pre, k), weight[0])
        if any_dead:
            total += weighted(*jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), k_aux), weight[1])
        return total

    got = jax.grad(ours, argnums=(0, 1, 2))(b_pre, w_enc, b_enc)
    want = jax.grad(reference, argnums=(0, 1, 2))(b_pre, w_enc, b_enc)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_encode_select_aux_filler_when_nothing_is_dead():
    encode = make_encode_select(4, 8)
    x = jnp.ones((3, 8))
    _, _, aux_values, _ = encode(x, jnp.zeros(8), jnp.eye(8, 64), jnp.zeros(64), jnp.zeros(64, bool), jnp.array(0))
    assert aux_values.shape == (3, 8) and bool(jnp.all(aux_values == -jnp.inf))


def test_geometric_median_known_answers():
    # Collinear points: the geometric median is the ordinary median.
    line = jnp.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    np.testing.assert_allclose(geometric_median(line), [2.0, 0.0], atol=1e-3)
    # Vertices of an equilateral triangle: the centre (Fermat point).
    tri = jnp.array([[0.0, 1.0], [np.sqrt(3) / 2, -0.5], [-np.sqrt(3) / 2, -0.5]])
    np.testing.assert_allclose(geometric_median(tri), [0.0, 0.0], atol=1e-4)
    # Robust to an outlier, unlike the mean.
    cloud = jax.random.normal(jax.random.PRNGKey(0), (2000, 8)) + 3.0
    cloud = cloud.at[0].set(1e6)
    assert float(jnp.max(jnp.abs(geometric_median(cloud) - 3.0))) < 0.1


def test_auxk_block_capacities_and_branch_choice():
    from saejax.ops import compact

    assert compact.capacities(4, 256) == (4, 16, 64)
    assert compact.capacities(16, 256) == (16, 64, 256)
    assert compact.capacities(512, 1024) == (512, 1024)
    caps = (4, 16, 64)
    chosen = [int(compact.branch_index(jnp.array(c), caps)) for c in (0, 1, 4, 5, 16, 17, 64, 65, 256)]
    assert chosen == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # 0: skip, 1..3: dense blocks, 4: sparse path
    mask = jnp.zeros(10, bool).at[jnp.array([2, 7])].set(True)
    ids = compact.member_ids(mask, 4)
    np.testing.assert_array_equal(ids, [2, 7, 10, 10])
    pos, member = compact.block_positions(ids, jnp.array([[7, 3, 2]]), 10)
    np.testing.assert_array_equal(pos, [[1, 0, 0]])
    np.testing.assert_array_equal(member, [[True, False, True]])

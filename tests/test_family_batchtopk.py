"""BatchTopK: the exact sharded batch selection, its fallback, the threshold estimate, inference, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import small_config
from references import batchtopk as ref
from saejax.algorithms import get_algorithm
from saejax.config import validate
from saejax.data import make_source
from saejax.errors import ConfigError
from saejax.models import get_family
from saejax.models.base import DenseCodes, LossContext
from saejax.ops import batch_topk as bt
from saejax.plan import all_gather_shapes, batch_sharding, compile_train_step
from saejax.sharding import make_mesh, named

MESHES = [(1, 1), (1, 8), (2, 4), (8, 1)]


def config(**overrides):
    return small_config(**{**ref.OVERRIDES, **overrides})


def setup(cfg, mesh_shape, seed=0):
    mesh = make_mesh(*mesh_shape)
    family = get_family(cfg)
    x = jnp.asarray(make_source(cfg).read(0, cfg.data.batch_size))
    params = family.init_params(jax.random.PRNGKey(seed), x)
    params, state = ref.perturb(params, family.init_state(params, x), jax.random.PRNGKey(seed + 1))
    return mesh, family, params, state, x


def place(mesh, family, params):
    specs = family.param_specs()
    return {name: jax.device_put(params[name], named(mesh, s.axes)) for name, s in specs.items()}


def dense_pre(params, x):
    return (x - params["b_pre"]) @ params["W_enc"] + params["b_enc"]


# ------------------------------------------------------------------ the bisection kernel


def test_ordered_keys_sort_like_the_floats_and_invert():
    values = jnp.array([-jnp.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.25, jnp.inf], jnp.float32)
    keys = np.asarray(bt.ordered_keys(values)).astype(np.int64)
    assert np.all(np.diff(keys) > 0)
    np.testing.assert_array_equal(bt.keys_to_values(bt.ordered_keys(values)), values)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_kth_largest_over_a_sharded_block_is_exact(mesh_shape):
    mesh = make_mesh(*mesh_shape)
    values = jax.random.normal(jax.random.PRNGKey(0), (16, 64)) * 3.0
    count = 37
    found = jax.shard_map(lambda v: bt.kth_largest(v, count), mesh=mesh,
                          in_specs=jax.sharding.PartitionSpec("data", "model"),
                          out_specs=jax.sharding.PartitionSpec())(values)
    assert float(found) == float(jnp.sort(values.reshape(-1))[-count])


# ------------------------------------------------------------------ the selection


def kept_mask(pre, k):
    mask = np.zeros(pre.size, bool)
    mask[np.asarray(jax.lax.top_k(pre.reshape(-1), pre.shape[0] * k)[1])] = True
    return mask.reshape(pre.shape)


# (overrides, tokens made 30x larger, the path expected on each of MESHES). Path 0: the candidates
# suffice (40 per token; the most any token keeps here is 35). Path 1: a large token wins more
# latents than its candidates on some device and its row is re-read. Path 2: more such rows than
# a device may re-read. With 32 latents per device (1x8) and C >= 32 every latent is a candidate.
CASES = [
    ({"sae.batchtopk.capacity_factor": 5}, (), (0, 0, 0, 0)),
    ({"sae.batchtopk.capacity_factor": 5}, (5,), (1, 0, 0, 1)),
    ({"sae.batchtopk.capacity_factor": 2}, (5,), (2, 1, 1, 2)),
    ({"sae.batchtopk.capacity_factor": 1, "sae.batchtopk.overflow_fraction": 0.01}, (5, 6, 7), (2, 2, 2, 2)),
]


def case_batch(x, large_tokens):
    for row in large_tokens:
        x = x.at[row].multiply(30.0)
    return x


@pytest.mark.parametrize("mesh_index", range(len(MESHES)), ids=[f"{a}x{b}" for a, b in MESHES])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kept_entries_equal_lax_top_k_of_the_flattened_batch(mesh_index, case):
    overrides, large_tokens, paths = CASES[case]
    mesh, family, params, _, x = setup(config(**overrides), MESHES[mesh_index])
    x = case_batch(x, large_tokens)
    codes, taken = jax.jit(lambda p, b: family.training_codes(p, b, mesh))(
        place(mesh, family, params), jax.device_put(x, batch_sharding(mesh)))
    pre = dense_pre(params, x)
    expected = kept_mask(pre, family.k)
    assert np.all(np.asarray(pre)[expected] > 0), "the test wants every kept entry to be visible as a code"
    np.testing.assert_array_equal(np.asarray(codes.values) > 0, expected)
    np.testing.assert_allclose(codes.values, np.where(expected, pre, 0.0), rtol=1e-5, atol=1e-6)
    assert int(taken) == paths[mesh_index]


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_ties_at_the_threshold_are_all_kept(mesh_shape):
    cfg = config()
    mesh, family, params, _, x = setup(cfg, mesh_shape)
    x = jnp.tile(x[:8], (8, 1))  # every token 8 times: each value is tied 8 times
    codes, _ = jax.jit(lambda p, b: family.training_codes(p, b, mesh))(
        place(mesh, family, params), jax.device_put(x, batch_sharding(mesh)))
    pre = dense_pre(params, x)
    tau = jnp.sort(pre.reshape(-1))[-x.shape[0] * family.k]
    kept = np.asarray(codes.values) > 0
    np.testing.assert_array_equal(kept, np.asarray((pre >= tau) & (pre > 0)))
    assert kept.sum() >= x.shape[0] * family.k


@pytest.mark.parametrize("case", [2, 3])
def test_the_exact_fallbacks_train_like_the_dense_reference(case):
    overrides, large_tokens, paths = CASES[case]
    mesh, family, params, state, x = setup(config(**overrides), (2, 4))
    x = case_batch(x, large_tokens)
    dead = jnp.arange(family.n) % 3 == 0
    step = jnp.asarray(3, jnp.int32)

    def loss(p):
        return family.loss(p, state, x, LossContext(step=step, dead=dead, mesh=mesh))

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(place(mesh, family, params))
    assert float(out.metrics["selection_path"]) == paths[MESHES.index((2, 4))]
    expected = ref.reference(family, params, state, x, step, dead)
    ref_grads = jax.grad(lambda p: ref.reference(family, p, state, x, step, dead)["loss"])(params)
    np.testing.assert_allclose(value, expected["loss"], rtol=2e-5)
    for key in ref_grads:
        np.testing.assert_allclose(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(out.fire_counts, expected["fire_counts"])
    np.testing.assert_allclose(out.state["threshold"], expected["state"]["threshold"], rtol=1e-6)


def test_no_batch_by_latents_block_is_all_gathered():
    cfg = config(**{"sae.n": 4096, "data.batch_size": 128})
    mesh = make_mesh(2, 4)
    family = get_family(cfg)
    algorithm = get_algorithm(family, cfg, mesh)
    compiled = compile_train_step(algorithm, algorithm.abstract_state(64), 128, mesh)
    gathered = [int(np.prod(s)) for s in all_gather_shapes(compiled.as_text())]
    per_device_block = (128 // 2) * (4096 // 4)
    # Only AuxK's per-token candidates are all-gathered; the batch selection exchanges counts.
    assert max(gathered, default=0) <= (128 // 2) * family.k_aux * 4 < per_device_block


# ------------------------------------------------------------------ gradient of the selection


def test_encoder_bias_gradient_is_the_kept_entries_residual_projection():
    """d nmse / d b_enc_j = sum over tokens b where (b, j) is kept and pre > 0 of -2 r_b . W_dec_j / den."""
    cfg = config(**{"sae.batchtopk.auxk_coef": 0.0})
    mesh, family, params, state, x = setup(cfg, (2, 4))
    ctx = LossContext(step=jnp.asarray(0, jnp.int32), dead=jnp.zeros(family.n, bool), mesh=mesh)
    grads = jax.jit(jax.grad(lambda p: family.loss(p, state, x, ctx)[0]))(place(mesh, family, params))
    pre = dense_pre(params, x)
    active = kept_mask(pre, family.k) & (np.asarray(pre) > 0)
    z = np.where(active, pre, 0.0)
    residual = np.asarray(x) - (z @ np.asarray(params["W_dec"]) + np.asarray(params["b_pre"]))
    den = np.sum((np.asarray(x) - np.asarray(x).mean(0)) ** 2)
    by_hand = np.sum(active * (-2.0 * residual @ np.asarray(params["W_dec"]).T), axis=0) / den
    np.testing.assert_allclose(grads["b_enc"], by_hand, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grads["b_enc"])[~active.any(0)] == 0), "latents not kept get no gradient"


# ------------------------------------------------------------------ threshold estimate


@pytest.mark.parametrize("per_latent", [False, True])
def test_threshold_estimate_starts_at_the_first_observation_then_follows_the_ema(per_latent):
    cfg = config(**{"sae.batchtopk.threshold_per_latent": per_latent, "sae.batchtopk.threshold_start_step": 2,
                    "sae.batchtopk.threshold_decay": 0.9})
    mesh, family, params, _, x = setup(cfg, (2, 4))
    placed, dead = place(mesh, family, params), jnp.zeros(family.n, bool)
    state = family.init_state(params, x)
    assert np.all(np.isinf(state["threshold"]))
    pre = dense_pre(params, x)
    z = np.where(kept_mask(pre, family.k) & (np.asarray(pre) > 0), pre, np.inf)
    smallest = z.min(0) if per_latent else z.min()

    def step(state, i):
        ctx = LossContext(step=jnp.asarray(i, jnp.int32), dead=dead, mesh=mesh)
        return jax.jit(lambda p, s: family.loss(p, s, x, ctx)[1].state)(placed, state)

    before_start = step(state, 1)
    assert np.all(np.isinf(before_start["threshold"]))
    first = step(before_start, 2)
    np.testing.assert_allclose(first["threshold"], smallest, rtol=1e-6)
    moved = step({"threshold": jnp.full_like(first["threshold"], 2.0)}, 3)
    expected = np.where(np.isinf(smallest), 2.0, 0.9 * 2.0 + 0.1 * smallest)
    np.testing.assert_allclose(moved["threshold"], expected, rtol=1e-6)
    if per_latent:  # the contract comparison, for the per-latent state
        out = ref.reference(family, params, {"threshold": jnp.full((family.n,), 2.0)}, x, 3, dead)
        np.testing.assert_allclose(moved["threshold"], out["state"]["threshold"], rtol=1e-6)


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize("per_latent", [False, True])
def test_inference_is_a_jumprelu_with_the_estimated_threshold(per_latent):
    cfg = config(**{"sae.batchtopk.threshold_per_latent": per_latent})
    mesh, family, params, state, x = setup(cfg, (2, 4))
    theta = jnp.full(family.state_specs()["threshold"].shape, 0.3)
    inference = family.inference_params(params, {"threshold": theta})
    placed = {name: jax.device_put(inference[name], named(mesh, s.axes))
              for name, s in family.inference_specs().items()}
    codes = jax.jit(lambda p, b: family.encode(p, b, mesh))(placed, x)
    assert isinstance(codes, DenseCodes)
    pre = dense_pre(params, x)
    np.testing.assert_allclose(codes.values, np.where(pre > 0.3, pre, 0.0), rtol=1e-5, atol=1e-6)
    recon = jax.jit(lambda p, c: family.decode(p, c, mesh))(placed, codes)
    np.testing.assert_allclose(recon, codes.values @ params["W_dec"] + params["b_pre"], rtol=1e-5, atol=1e-5)
    tensors, cfg_json = family.export(inference)
    assert "threshold" in tensors and cfg_json["layout"]["threshold"] == (["n"] if per_latent else [])
    activation = cfg_json["activation"]
    assert activation["kind"] == "jumprelu" and activation["trained_as"] == "batchtopk"
    assert activation["k"] == family.k == cfg_json["k"]


def test_sparsity_control_is_k():
    family = get_family(config(**{"sae.batchtopk.k": 12}))
    assert family.sparsity_control() == {"name": "k", "value": 12, "is_k": True}


# ------------------------------------------------------------------ bad configs


@pytest.mark.parametrize("key,value,message", [
    ("k", 0, r"sae.batchtopk.k=0 must be between 1 and sae.n=256"),
    ("k", 257, r"sae.batchtopk.k=257 must be between 1 and sae.n=256"),
    ("auxk_coef", -0.5, r"sae.batchtopk.auxk_coef=-0.5 must be >= 0 \(0 disables AuxK\)"),
    ("k_aux", 0, r"sae.batchtopk.k_aux=0 must be >= 1 \(or unset\)"),
    ("capacity_factor", 0, r"sae.batchtopk.capacity_factor=0 must be >= 1"),
    ("threshold_decay", 1.0, r"sae.batchtopk.threshold_decay=1.0 must be in \[0, 1\)"),
    ("threshold_decay", -0.1, r"sae.batchtopk.threshold_decay=-0.1 must be in \[0, 1\)"),
    ("overflow_fraction", 0.0, r"sae.batchtopk.overflow_fraction=0.0 must be in \(0, 1\]"),
    ("threshold_start_step", -1, r"sae.batchtopk.threshold_start_step=-1 must be >= 0"),
])
def test_bad_config_is_refused_with_a_clear_message(key, value, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        validate(config(**{f"sae.batchtopk.{key}": value}), 1)

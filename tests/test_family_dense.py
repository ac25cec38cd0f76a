"""The dense-code families (relu, prolu, gated): their estimators, schedules, checks and layout.

The contract (loss, gradients and state against a dense reference on every mesh,
training, resume, export) is tests/test_families.py; here are what it does not see:
the straight-through derivatives against their definitions evaluated by hand,
the L1 warm-up, what the penalty is invariant to, config errors, and that no
(B, n) block or dictionary is ever all-gathered.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import small_config
from saejax.algorithms import get_algorithm
from saejax.config import load_config, validate
from saejax.errors import ConfigError
from saejax.models import get_family
from saejax.models.base import DenseCodes, LossContext
from saejax.models.prolu import make_prolu
from saejax.plan import all_gather_shapes, batch_sharding, compile_train_step
from saejax.sharding import make_mesh, named, spec

DENSE = ["relu", "prolu", "gated"]

# A row of ProLU inputs covering every case: fires; m <= 0; m > 0 gated off by b; fires with b < 0.
M = jnp.array([[0.5, -0.3, 1.2, 0.8]])
B = jnp.array([0.1, 0.5, -1.5, -0.2])
UPSTREAM = jnp.array([[2.0, 3.0, 5.0, 7.0]])


def _prolu_grads(ste):
    return jax.grad(lambda m, b: jnp.sum(UPSTREAM * make_prolu(ste)(m, b)), argnums=(0, 1))(M, B)


def test_prolu_forward_is_m_where_both_gates_are_open():
    np.testing.assert_allclose(make_prolu("ste")(M, B), [[0.5, 0.0, 0.0, 0.8]])
    np.testing.assert_allclose(make_prolu("relu")(M, B), [[0.5, 0.0, 0.0, 0.8]])


def test_prolu_ste_gradients_are_g_m_for_the_bias_and_g_1_plus_m_for_m():
    d_m, d_b = _prolu_grads("ste")
    # G = [1, 0, 0, 1]: d/db = G m g = [0.5*2, 0, 0, 0.8*7]; d/dm = G (1 + m) g = [1.5*2, 0, 0, 1.8*7].
    np.testing.assert_allclose(d_b, [1.0, 0.0, 0.0, 5.6], rtol=1e-6)
    np.testing.assert_allclose(d_m, [[3.0, 0.0, 0.0, 12.6]], rtol=1e-6)


def test_prolu_relu_gradients_are_the_gated_upstream_for_both():
    d_m, d_b = _prolu_grads("relu")
    np.testing.assert_allclose(d_b, [2.0, 0.0, 0.0, 7.0])
    np.testing.assert_allclose(d_m, [[2.0, 0.0, 0.0, 7.0]])


def test_prolu_bias_gradient_sums_over_the_batch():
    m = jnp.concatenate([M, 2 * M])
    d_b = jax.grad(lambda b: jnp.sum(make_prolu("ste")(m, b)))(B)
    # Second row m = [1, -0.6, 2.4, 1.6]: latent 2 now passes its bias (2.4 - 1.5 > 0).
    np.testing.assert_allclose(d_b, [0.5 + 1.0, 0.0, 2.4, 0.8 + 1.6], rtol=1e-6)


def _setup(name, mesh_shape=(1, 1), **overrides):
    config = small_config(**{"sae.family": name, f"sae.{name}.l1_warmup_steps": 0, **overrides})
    family = get_family(config)
    x = jax.random.normal(jax.random.PRNGKey(3), (64, family.d)) + 0.5
    params = family.init_params(jax.random.PRNGKey(0), x)
    return family, params, x, make_mesh(*mesh_shape)


def _loss(family, params, x, mesh, step=10):
    ctx = LossContext(step=jnp.asarray(step, jnp.int32), dead=jnp.zeros((family.n,), bool), mesh=mesh)
    return family.loss(params, {}, x, ctx)


def test_gated_gate_learns_only_from_the_penalty_and_the_auxiliary_term():
    family, params, x, mesh = _setup("gated", **{"sae.gated.l1_coef": 0.0, "sae.gated.aux_coef": 0.0})
    params = {**params, "b_gate": 0.1 * jax.random.normal(jax.random.PRNGKey(1), (family.n,))}
    grads = jax.grad(lambda p: _loss(family, p, x, mesh)[0])(params)
    # 1[pi > 0] passes no gradient: the main reconstruction does not move the gate bias.
    np.testing.assert_array_equal(grads["b_gate"], 0.0)
    assert float(jnp.abs(grads["b_mag"]).max()) > 0 and float(jnp.abs(grads["r_mag"]).max()) > 0


def test_gated_auxiliary_reconstruction_does_not_train_the_decoder():
    family, params, x, mesh = _setup("gated", **{"sae.gated.l1_coef": 0.0})
    without, _, _, _ = _setup("gated", **{"sae.gated.l1_coef": 0.0, "sae.gated.aux_coef": 0.0})
    with_aux = jax.grad(lambda p: _loss(family, p, x, mesh)[0])(params)
    main_only = jax.grad(lambda p: _loss(without, p, x, mesh)[0])(params)
    np.testing.assert_allclose(with_aux["W_dec"], main_only["W_dec"], rtol=1e-6, atol=1e-9)
    assert not np.allclose(with_aux["b_gate"], main_only["b_gate"])  # but it does train the gate
    _, out = _loss(family, params, x, mesh)
    assert float(out.metrics["aux_loss"]) > 0


@pytest.mark.parametrize("name", DENSE)
def test_l1_coefficient_warms_up_linearly_from_zero(name):
    family = get_family(small_config(**{"sae.family": name, f"sae.{name}.l1_coef": 2.0,
                                        f"sae.{name}.l1_warmup_steps": 8}))
    coefs = [float(family.l1_coef_at(jnp.asarray(s))) for s in (0, 2, 4, 8, 100)]
    np.testing.assert_allclose(coefs, [0.0, 0.5, 1.0, 2.0, 2.0])
    by_fraction = get_family(small_config(**{"sae.family": name, f"sae.{name}.l1_warmup_fraction": 0.1,
                                             "train.steps": 300}))
    assert by_fraction.warmup_steps == 30


@pytest.mark.parametrize("name", DENSE)
def test_penalty_is_weighted_by_decoder_norms(name):
    """Scaling the decoder up and the encoder down by c changes neither codes' effect nor the loss."""
    family, params, x, mesh = _setup(name)
    c = 4.0
    bias = "b_gate" if name == "gated" else "b_enc"
    scaled = {**params, "W_dec": params["W_dec"] * c, "W_enc": params["W_enc"] / c, bias: params[bias] / c}
    if name == "gated":
        scaled["b_mag"] = params["b_mag"] / c
    np.testing.assert_allclose(_loss(family, scaled, x, mesh)[0], _loss(family, params, x, mesh)[0], rtol=1e-5)
    _, out = _loss(family, params, x, mesh)
    assert {"nmse", "l0", "l1_loss", "l1_coef"} <= set(out.metrics)


@pytest.mark.parametrize("name", DENSE)
def test_init_is_tied_with_small_random_decoder_rows(name):
    family, params, x, _ = _setup(name, **{f"sae.{name}.init_decoder_norm": 0.25})
    np.testing.assert_allclose(jnp.linalg.norm(params["W_dec"], axis=1), 0.25, rtol=1e-5)
    np.testing.assert_array_equal(params["W_enc"], params["W_dec"].T)


@pytest.mark.parametrize("name", DENSE)
def test_encode_gives_latent_sharded_dense_codes(name):
    family, params, x, _ = _setup(name)
    mesh = make_mesh(2, 4)
    placed = {k: jax.device_put(params[k], named(mesh, s.axes)) for k, s in family.param_specs().items()}
    codes = jax.jit(lambda p, b: family.encode(p, b, mesh))(placed, jax.device_put(x, batch_sharding(mesh)))
    assert isinstance(codes, DenseCodes) and codes.values.shape == (64, family.n)
    assert codes.values.sharding.spec == spec(("batch", "latent"))
    recon = jax.jit(lambda p, c: family.decode(p, c, mesh))(placed, codes)
    np.testing.assert_allclose(recon, family.decode(params, family.encode(params, x, make_mesh(1, 1)),
                                                    make_mesh(1, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DENSE)
def test_train_step_gathers_no_code_block_and_no_dictionary(name):
    config = small_config(**{"sae.family": name, "sae.n": 4096, "data.batch_size": 128})
    mesh = make_mesh(2, 4)
    algorithm = get_algorithm(get_family(config), config, mesh)
    compiled = compile_train_step(algorithm, algorithm.abstract_state(64), 128, mesh)
    gathered = [int(np.prod(s)) for s in all_gather_shapes(compiled.as_text())]
    per_device_block = (128 // 2) * (4096 // 4)
    per_device_dictionary = 16 * 4096 // 4
    assert max(gathered, default=0) < min(per_device_block, per_device_dictionary), gathered


@pytest.mark.parametrize("name", DENSE)
def test_default_config_trains_any_dense_family(name):
    config = load_config("default", [("sae.family", name)])
    validate(config, 1)
    assert config.sae.family == name and config.sae[name].l1_coef > 0


BAD = [
    ("relu", {"sae.relu.l1_coef": -1.0}, "sae.relu.l1_coef=-1.0 must be >= 0"),
    ("relu", {"sae.relu.l1_warmup_steps": -5}, r"sae.relu.l1_warmup_steps=-5 must be >= 0 \(or unset\)"),
    ("relu", {"sae.relu.l1_warmup_fraction": 1.5}, r"sae.relu.l1_warmup_fraction=1.5 must be in \[0, 1\]"),
    ("relu", {"sae.relu.init_decoder_norm": 0.0}, "sae.relu.init_decoder_norm=0.0 must be > 0"),
    ("prolu", {"sae.prolu.l1_coef": -0.5}, "sae.prolu.l1_coef=-0.5 must be >= 0"),
    ("prolu", {"sae.prolu.ste": "sigmoid"}, "sae.prolu.ste='sigmoid' must be one of ste, relu"),
    ("gated", {"sae.gated.l1_coef": -2.0}, "sae.gated.l1_coef=-2.0 must be >= 0"),
    ("gated", {"sae.gated.aux_coef": -1.0}, "sae.gated.aux_coef=-1.0 must be >= 0"),
]


@pytest.mark.parametrize("name, overrides, message", BAD)
def test_bad_values_are_config_errors(name, overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        validate(small_config(**{"sae.family": name, **overrides}), 1)


def test_a_key_of_another_dense_family_is_refused():
    with pytest.raises(ConfigError, match="belongs to family 'gated'"):
        validate(small_config(**{"sae.family": "relu", "sae.gated.aux_coef": 0.5}), 1)

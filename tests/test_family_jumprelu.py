"""JumpReLU: its straight-through pseudo-derivatives, config errors, the target-L0 controller,
the fixed-coefficient loss against the dense reference, and what it exports."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import small_config
from references import jumprelu as reference_module
from saejax.algorithms import get_algorithm
from saejax.config import validate
from saejax.data import make_source
from saejax.errors import ConfigError
from saejax.models import get_family
from saejax.models.base import DenseCodes, LossContext
from saejax.models.jumprelu import heaviside, jump_relu, warmup_factor
from saejax.plan import all_gather_shapes, batch_sharding, compile_train_step
from saejax.sharding import make_mesh, named

# TopK keys of small_config reset to their defaults, so validate() sees no stray TopK setting.
BASE = {"sae.family": "jumprelu", "sae.topk.k": 16, "sae.topk.k_aux": None}

EPS, THETA = 0.1, 0.5
# The window |pre - theta| < eps/2 = 0.05 holds 0.52 and 0.49 (0.549 too; 0.551 and 0.45 are outside).
PRE = jnp.array([0.3, 0.52, 0.58, 0.7, 0.49, 0.549, 0.551, 0.45, -1.0])
IN_WINDOW = np.array([0, 1, 0, 0, 1, 1, 0, 0, 0], np.float32)
ABOVE = np.array([0, 1, 1, 1, 0, 1, 1, 0, 0], np.float32)


def config(**overrides):
    return small_config(**{**BASE, **overrides})


# ---------------------------------------------------------------------------- pseudo-derivatives


def test_jump_relu_derivatives_are_the_rectangle_kernel_formulas():
    theta = jnp.full(PRE.shape, THETA)
    value, vjp = jax.vjp(lambda p, t: jump_relu(p, t, EPS), PRE, theta)
    d_pre, d_theta = vjp(jnp.ones_like(PRE))
    np.testing.assert_array_equal(value, np.asarray(PRE) * ABOVE)
    np.testing.assert_array_equal(d_pre, ABOVE)  # H(pre - theta)
    np.testing.assert_allclose(d_theta, -(THETA / EPS) * IN_WINDOW, rtol=1e-6)  # -(theta/eps) K


def test_heaviside_derivatives_are_the_rectangle_kernel_formulas():
    theta = jnp.full(PRE.shape, THETA)
    value, vjp = jax.vjp(lambda p, t: heaviside(p, t, EPS), PRE, theta)
    d_pre, d_theta = vjp(jnp.ones_like(PRE))
    np.testing.assert_array_equal(value, ABOVE)
    np.testing.assert_array_equal(d_pre, np.zeros_like(ABOVE))
    np.testing.assert_allclose(d_theta, -(1 / EPS) * IN_WINDOW, rtol=1e-6)  # -(1/eps) K


def test_a_broadcast_threshold_sums_the_batch_and_the_log_parameter_scales_by_theta():
    pre = jnp.stack([PRE, PRE + 0.03])  # (2 tokens, 9 latents)
    log_theta = jnp.full(PRE.shape, math.log(THETA))
    grad = jax.grad(lambda lt: jnp.sum(heaviside(pre, jnp.exp(lt), EPS)))(log_theta)
    in_window = (np.abs(np.asarray(pre) - THETA) < EPS / 2).astype(np.float32)
    np.testing.assert_allclose(grad, THETA * -(1 / EPS) * in_window.sum(0), rtol=1e-6)


def test_warmup_ramps_linearly_to_one():
    ramp = [float(warmup_factor(jnp.asarray(s), 4)) for s in range(6)]
    assert ramp == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert float(warmup_factor(jnp.asarray(0), 0)) == 1.0


# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, message", [
    ({"sae.jumprelu.bandwidth": 0.0}, r"sae\.jumprelu\.bandwidth=0\.0 must be > 0 \(the kernel width eps\)"),
    ({"sae.jumprelu.bandwidth": -0.1}, r"sae\.jumprelu\.bandwidth=-0\.1 must be > 0"),
    ({"sae.jumprelu.l0_coef": -1e-3}, r"sae\.jumprelu\.l0_coef=-0\.001 must be a finite number >= 0"),
    ({"sae.jumprelu.init_threshold": 0.0},
     r"sae\.jumprelu\.init_threshold=0\.0 must be > 0 \(theta is log-parameterised\)"),
    ({"sae.jumprelu.target_l0": 0.0}, r"sae\.jumprelu\.target_l0=0\.0 must be in \(0, sae\.n=256\]"),
    ({"sae.jumprelu.target_l0": 257.0}, r"sae\.jumprelu\.target_l0=257\.0 must be in \(0, sae\.n=256\]"),
    ({"sae.jumprelu.target_l0": 8.0, "sae.jumprelu.l0_coef": 0.0},
     r"l0_coef=0\.0 must be > 0 with target_l0 "
     r"\(it is the coefficient the target_l0 controller starts from\)"),
    ({"sae.jumprelu.target_rate": 0.0}, r"sae\.jumprelu\.target_rate=0\.0 must be in \(0, 1\]"),
    ({"sae.jumprelu.target_rate": 1.5}, r"sae\.jumprelu\.target_rate=1\.5 must be in \(0, 1\]"),
    ({"sae.jumprelu.coef_warmup_steps": -1},
     r"sae\.jumprelu\.coef_warmup_steps=-1 must be >= 0 \(or unset\)"),
    ({"sae.jumprelu.coef_warmup_fraction": 1.5},
     r"sae\.jumprelu\.coef_warmup_fraction=1\.5 must be in \[0, 1\]"),
])
def test_bad_configs_are_refused_with_clear_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(**overrides), 1)


def test_good_configs_pass_and_the_warmup_defaults_to_a_fraction_of_the_steps():
    validate(config(), 1)
    validate(config(**{"sae.jumprelu.target_l0": 256.0}), 1)
    assert get_family(config(**{"train.steps": 1000})).warmup_steps == 100
    assert get_family(config(**{"sae.jumprelu.coef_warmup_steps": 7})).warmup_steps == 7


# ---------------------------------------------------------------------------- loss and controller


def _batch_and_params(cfg, family):
    x = jnp.asarray(make_source(cfg).read(0, cfg.data.batch_size))
    params = family.init_params(jax.random.PRNGKey(0), x)
    params, state = reference_module.perturb(params, family.init_state(params, x), jax.random.PRNGKey(1))
    return x, params, state


@pytest.mark.parametrize("step", [0, 5])
def test_fixed_coefficient_loss_and_gradients_equal_the_reference_on_a_2x4_mesh(step):
    cfg = config(**{"sae.jumprelu.coef_warmup_steps": 3})  # step 0 is inside the warm-up, 5 past it
    family, mesh = get_family(cfg), make_mesh(2, 4)
    x, params, state = _batch_and_params(cfg, family)
    assert state == {} and family.state_specs() == {}
    dead = jnp.zeros((family.n,), bool)
    ctx = LossContext(step=jnp.asarray(step, jnp.int32), dead=dead, mesh=mesh)
    placed = {k: jax.device_put(v, named(mesh, family.param_specs()[k].axes)) for k, v in params.items()}
    (value, out), grads = jax.jit(jax.value_and_grad(lambda p, b: family.loss(p, {}, b, ctx), has_aux=True))(
        placed, jax.device_put(x, batch_sharding(mesh)))
    ref = lambda p: reference_module.reference(family, p, {}, x, jnp.asarray(step), dead)  # noqa: E731
    np.testing.assert_allclose(value, ref(params)["loss"], rtol=2e-5)
    for key, ref_grad in jax.grad(lambda p: ref(p)["loss"])(params).items():
        np.testing.assert_allclose(grads[key], ref_grad, rtol=1e-4, atol=1e-6, err_msg=key)
    assert np.any(grads["log_threshold"] != 0), "some pre-activations must fall in the kernel's window"
    np.testing.assert_allclose(out.metrics["l0_coef"], family.l0_coef * min((step + 1) / 3, 1.0), rtol=1e-6)
    np.testing.assert_allclose(out.metrics["l0_loss"], out.metrics["l0_coef"] * out.metrics["l0"], rtol=1e-6)


@pytest.mark.parametrize("target, direction", [(1.0, "up"), (256.0, "down")])
def test_the_controller_moves_the_coefficient_toward_the_target_by_at_most_the_rate(target, direction):
    cfg = config(**{"sae.jumprelu.target_l0": target, "sae.jumprelu.target_rate": 0.1,
                    "sae.jumprelu.coef_warmup_steps": 3})
    family, mesh = get_family(cfg), make_mesh(1, 1)
    x, params, state = _batch_and_params(cfg, family)
    dead = jnp.zeros((family.n,), bool)

    def new_coef(step):
        ctx = LossContext(step=jnp.asarray(step, jnp.int32), dead=dead, mesh=mesh)
        _, out = family.loss(params, state, x, ctx)
        return float(out.state["l0_coef"]), float(out.metrics["l0"])

    start = float(state["l0_coef"])
    assert new_coef(0)[0] == start and new_coef(1)[0] == start  # no wind-up during the warm-up
    coef, l0 = new_coef(2)
    expected = start * math.exp(0.1 * max(-1.0, min(1.0, (l0 - target) / target)))
    assert coef == pytest.approx(expected, rel=1e-6)
    assert (coef > start) if direction == "up" else (coef < start)
    assert math.exp(-0.1) - 1e-6 <= coef / start <= math.exp(0.1) + 1e-6


def test_sparsity_control_and_family_state_follow_target_l0():
    fixed, targeted = get_family(config()), get_family(config(**{"sae.jumprelu.target_l0": 16.0}))
    assert fixed.sparsity_control() == {"name": "l0_coef", "value": fixed.l0_coef, "is_k": False}
    assert targeted.sparsity_control() == {"name": "target_l0", "value": 16.0, "is_k": False}
    assert targeted.state_specs()["l0_coef"].axes == () and "target_l0=16.0" in targeted.describe()


def test_the_train_step_gathers_no_batch_by_latents_block():
    cfg = config(**{"sae.n": 1024, "data.batch_size": 128, "sae.jumprelu.target_l0": 16.0})
    mesh = make_mesh(2, 4)
    algorithm = get_algorithm(get_family(cfg), cfg, mesh)
    compiled = compile_train_step(algorithm, algorithm.abstract_state(64), 128, mesh)
    per_device_block = (128 // 2) * (1024 // 4)
    gathered = [int(np.prod(s)) for s in all_gather_shapes(compiled.as_text())]
    assert max(gathered, default=0) < per_device_block, gathered


# ---------------------------------------------------------------------------- inference and export


def test_export_holds_theta_not_its_log_and_encode_is_the_jump_relu():
    cfg = config()
    family, mesh = get_family(cfg), make_mesh(1, 2)
    x, params, state = _batch_and_params(cfg, family)
    inference = family.inference_params(params, state)
    tensors, cfg_json = family.export(inference)
    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    np.testing.assert_allclose(tensors["threshold"], np.exp(params["log_threshold"]), rtol=1e-6)
    assert cfg_json["activation"]["kind"] == "jumprelu" and cfg_json["layout"]["threshold"] == ["n"]
    codes = family.encode(inference, x, mesh)
    assert isinstance(codes, DenseCodes)
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    expected = np.where(pre > tensors["threshold"], pre, 0.0)
    np.testing.assert_allclose(codes.values, expected, rtol=1e-5, atol=1e-6)
    recon = expected @ params["W_dec"] + params["b_dec"]
    np.testing.assert_allclose(family.decode(inference, codes, mesh), recon, rtol=1e-4, atol=1e-5)

"""Binary autoencoder: estimators, the global-batch entropy and covariance terms, config, plan.

The family contract (tests/test_families.py with tests/references/binary.py) checks the whole
loss and its gradients on 1x8, 2x4 and 8x1 meshes, compile-once and bit-exact resume; here each
piece on its own.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, small_config
from references import binary as reference
from saejax.config import validate
from saejax.errors import ConfigError
from saejax.models import get_family
from saejax.models.base import LossContext
from saejax.models.binary import binarize, covariance_sum, entropy_bits
from saejax.sharding import make_mesh, named

MESHES = [(1, 8), (2, 4), (8, 1)]


def config(**overrides):
    return small_config(**{"sae.family": "binary", **overrides})


# ---------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("estimator", ["sign", "sign_s", "sigmoid"])
def test_each_estimator_passes_the_gradient_its_definition_says(estimator):
    pre = jnp.linspace(-3.0, 3.0, 13)
    g = jnp.linspace(-2.0, 1.5, 13)  # the upstream gradient, not all in [0, 1]
    value, vjp = jax.vjp(lambda u: binarize(u, estimator, 0.7), pre)
    np.testing.assert_array_equal(value, (pre > 0).astype(np.float32))
    (grad,) = vjp(g)
    s = 1.0 / (1.0 + np.exp(-np.asarray(pre) / 0.7))
    expected = {
        "sign": g,  # identity
        "sign_s": g * (1 - g),  # the reference's SignBinarization_sigmoid: a function of g itself
        "sigmoid": g * s * (1 - s) / 0.7,  # d/du sigmoid(u / T)
    }[estimator]
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- the terms, sharded


def torch_abs(t):
    return t * jax.lax.stop_gradient(jnp.sign(t))


def dense_entropy(h):
    p = h.mean(0)
    return -jnp.sum(p * jnp.log2(p + 1e-10) + (1 - p) * jnp.log2(1 - p + 1e-10))


def dense_covariance(h):
    """sum_{i != j} |Cov(h_i, h_j)| from the full n x n matrix, written out."""
    centred = h - h.mean(0)
    cov = centred.T @ centred / (h.shape[0] - 1)
    off = 1.0 - jnp.eye(h.shape[1])
    return jnp.sum(torch_abs(cov) * off)


@pytest.fixture(scope="module")
def codes():
    rng = np.random.default_rng(0)
    rates = rng.uniform(0.05, 0.95, size=64)
    binary = (rng.uniform(size=(32, 64)) < rates).astype(np.float32)
    binary[:, 0], binary[:, 1] = 1.0, 0.0  # p = 1 and p = 0 (p = 1 once made XLA's entropy NaN)
    continuous = rng.normal(size=(32, 64)).astype(np.float32)
    return {"binary": binary, "continuous": continuous}


def test_the_blockwise_covariance_is_the_dense_sum_of_off_diagonal_magnitudes(codes):
    for h in codes.values():
        expected = np.abs(np.cov(h.T.astype(np.float64)))
        expected = expected.sum() - np.trace(expected)
        for shape in [(1, 1)] + MESHES:
            mesh = make_mesh(*shape)
            got = jax.jit(lambda b: covariance_sum(b, mesh))(jax.device_put(h, named(mesh, ("batch", "latent"))))
            np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=str(shape))


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_entropy_and_covariance_and_their_gradients_equal_the_dense_reference(codes, mesh_shape):
    mesh = make_mesh(*mesh_shape)
    sharding = named(mesh, ("batch", "latent"))
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(32, 64)), jnp.float32)

    def terms(h, entropy, covariance):
        # A cotangent that differs per entry and per term: 0.3 H + 1.7 C + sum(w * h).
        return 0.3 * entropy(h) + 1.7 * covariance(h) + jnp.sum(weights * h)

    for kind, h in codes.items():
        binary = kind == "binary"  # the entropy is of firing rates in [0, 1]: binary codes only
        entropy, reference_entropy = ((lambda x: entropy_bits(x, mesh)), dense_entropy) if binary else (
            (lambda x: 0.0), (lambda x: 0.0))
        sharded = jax.jit(jax.value_and_grad(lambda b: terms(b, entropy, lambda x: covariance_sum(x, mesh))))
        value, grad = sharded(jax.device_put(h, sharding))
        want, want_grad = jax.value_and_grad(
            lambda b: terms(b, reference_entropy, dense_covariance))(jnp.asarray(h))
        np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5, err_msg=kind)
    h = codes["binary"]
    np.testing.assert_allclose(jax.jit(lambda b: entropy_bits(b, mesh))(jax.device_put(h, sharding)),
                               dense_entropy(jnp.asarray(h)), rtol=1e-6)


def test_the_entropy_is_of_the_global_batch_not_of_each_data_shard():
    # Each half of the batch fires a latent on all its rows: p = 1/2 globally (1 bit), 0 or 1 per shard.
    h = np.zeros((8, 8), np.float32)
    h[:4, 0] = 1.0
    mesh = make_mesh(2, 4)
    bits = jax.jit(lambda b: entropy_bits(b, mesh))(jax.device_put(h, named(mesh, ("batch", "latent"))))
    assert float(bits) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------- the loss: warm-up, threshold


def _loss_parts(cfg, step, mesh_shape=(2, 4)):
    family = get_family(cfg)
    mesh = make_mesh(*mesh_shape)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(64, 16)), jnp.float32)
    params = family.init_params(jax.random.PRNGKey(0), x)
    ctx = LossContext(step=jnp.asarray(step, jnp.int32), dead=jnp.zeros((family.n,), bool), mesh=mesh)
    loss, out = jax.jit(lambda p, b: family.loss(p, {}, b, ctx))(params, x)
    h = (x @ params["W_enc"] + params["b_enc"] > 0).astype(jnp.float32)
    recon = h @ params["W_dec"] + params["b_dec"]
    nmse = jnp.sum((x - recon) ** 2) / jnp.sum((x - x.mean(0)) ** 2)
    return float(loss), out.metrics, float(nmse), float(dense_entropy(h))


def test_the_entropy_term_switches_on_after_the_warmup_and_counts_zero_below_the_threshold():
    cfg = config(**{"sae.binary.entropy_weight": 1e-2, "sae.binary.entropy_warmup_steps": 4})
    before, metrics, nmse, bits = _loss_parts(cfg, 3)
    assert before == pytest.approx(nmse, rel=1e-5) and float(metrics["entropy_loss"]) == 0.0
    assert float(metrics["entropy_bits"]) == pytest.approx(bits, rel=1e-5)  # reported during warm-up too
    after, metrics, nmse, bits = _loss_parts(cfg, 4)
    assert after == pytest.approx(nmse + 1e-2 * bits, rel=1e-5)
    assert float(metrics["entropy_loss"]) == pytest.approx(1e-2 * bits, rel=1e-5)
    # Below the threshold H counts as 0 (the reference's `if entropy < threshold: return 0`).
    high = config(**{"sae.binary.entropy_weight": 1e-2, "sae.binary.entropy_threshold": bits + 1})
    loss, metrics, nmse, _ = _loss_parts(high, 4)
    assert loss == pytest.approx(nmse, rel=1e-5) and float(metrics["entropy_loss"]) == 0.0
    low = config(**{"sae.binary.entropy_weight": 1e-2, "sae.binary.entropy_threshold": bits - 1})
    assert _loss_parts(low, 4)[0] == pytest.approx(nmse + 1e-2 * bits, rel=1e-5)


def test_the_contract_resumes_across_the_entropy_warmup_boundary():
    # tests/test_families.py resumes a 6-step run from its step-3 checkpoint: steps 3, 4, 5 are
    # retaken, and the reference's warm-up switches the entropy on at step 3, inside that span.
    from test_families import RESUME_OVERRIDES

    warmup = reference.OVERRIDES["sae.binary.entropy_warmup_steps"]
    assert RESUME_OVERRIDES["checkpoint.every_steps"] <= warmup < RESUME_OVERRIDES["train.steps"]


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    ({"sae.binary.estimator": "tanh"},
     r"sae\.binary\.estimator='tanh' is not an estimator; choose one of: sign, sign_s, sigmoid"),
    ({"sae.binary.temperature": 0.0},
     r"sae\.binary\.temperature=0\.0 must be a finite number > 0 \(the sigmoid's T\)"),
    ({"sae.binary.temperature": float("inf")}, r"sae\.binary\.temperature=inf must be a finite number > 0"),
    ({"sae.binary.entropy_weight": -1e-3}, r"sae\.binary\.entropy_weight=-0\.001 must be a finite number >= 0"),
    ({"sae.binary.covariance_weight": -1.0}, r"sae\.binary\.covariance_weight=-1\.0 must be a finite number >= 0"),
    ({"sae.binary.entropy_threshold": -2.0}, r"sae\.binary\.entropy_threshold=-2\.0 must be a finite number >= 0"),
    ({"sae.binary.entropy_warmup_steps": -1}, r"sae\.binary\.entropy_warmup_steps=-1 must be >= 0"),
    ({"mesh.model": 3}, r"sae\.n=256 is not divisible by the model axis \(3 devices\)"),
    ({"sae.jumprelu.l0_coef": 0.5},
     r"config key 'sae\.jumprelu\.l0_coef' is set \(0\.5\) but belongs to family 'jumprelu', "
     r"and sae\.family='binary'; set sae\.family=jumprelu or remove the key"),
])
def test_bad_configs_are_refused_with_clear_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(**overrides), 8)


def test_defaults_validate_and_the_family_declares_its_control():
    validate(config(), 1)
    family = get_family(config())
    assert family.sparsity_control() == {"name": "entropy_weight", "value": 1e-4, "is_k": False}
    assert family.activation()["kind"] == "binary"
    no_bias = get_family(config(**{"sae.binary.output_bias": False}))
    assert "b_dec" not in no_bias.param_specs() and no_bias.activation()["decode"] == "x_hat = h @ W_dec"


# ---------------------------------------------------------------------------- AOT plan at scale

PLAN = r"""
import json, math, re, sys
import jax
jax.config.update("jax_num_cpu_devices", 64)
from saejax.algorithms import get_algorithm
from saejax.config import base_config
from saejax.models import get_family
from saejax.plan import compile_train_step
from saejax.sharding import make_mesh
c = base_config()
c.sae.family = "binary"
c.sae.d, c.sae.n = 4096, 2**18
c.sae.binary.covariance_weight = 1e-7
c.data.batch_size = 1024
mesh = make_mesh(2, 32)
algorithm = get_algorithm(get_family(c), c, mesh)
compiled = compile_train_step(algorithm, algorithm.abstract_state(64), 1024, mesh)
text = compiled.as_text()
shapes = [tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]+)\]", text)]
memory = compiled.memory_analysis()
json.dump({"ring_permutes": text.count("collective-permute("),
           "largest": max(math.prod(s) for s in shapes),
           "widest": max(max(s) for s in shapes),
           "temp_bytes": int(memory.temp_size_in_bytes),
           "argument_bytes": int(memory.argument_size_in_bytes)}, sys.stdout)
"""


@pytest.mark.slow
def test_the_covariance_step_at_n_2e18_on_64_devices_holds_no_n_by_n_buffer():
    n, d, b, data, model = 2**18, 4096, 1024, 2, 32
    result = subprocess.run([sys.executable, "-c", PLAN], capture_output=True, text=True, cwd=REPO,
                            timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    m = n // model
    assert plan["ring_permutes"] >= 2, plan  # the covariance ring, forward and backward
    # The largest array of the per-device program is an (m, m) covariance block or a d x m weight
    # shard; nothing spans n in any dimension, and the temporaries are far below one n x n matrix.
    assert plan["largest"] <= max(m * m, d * m, (b // data) * m), plan
    assert plan["widest"] < n, plan
    assert plan["temp_bytes"] < 4 * n * n / model, plan


# ---------------------------------------------------------------------------- feature-set entropy

HAND_X = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], np.float32)
H_QUARTER = 0.25 * 2 + 0.75 * np.log2(4 / 3)  # H_b(1/4) = 0.811278 bits


def hand_built_sae():
    """d=2, n=4: latent 0 fires where x_0 > 0, 1 where x_1 > 0, 2 where x_0 < 0, 3 never."""
    from saejax.export import SAE

    family = get_family(config(**{"sae.d": 2, "sae.n": 4}))
    params = {"W_enc": jnp.asarray([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]),
              "b_enc": jnp.asarray([0.0, 0.0, 0.0, -1.0]),
              "W_dec": jnp.ones((4, 2)), "b_dec": jnp.zeros((2,))}
    tensors, cfg = family.export(params)
    return SAE({k: np.asarray(v) for k, v in tensors.items()}, cfg)


def test_feature_set_entropy_of_a_hand_built_bae():
    from saejax.entropy import entropy, entropy_from_counts

    # On HAND_X latents 0 and 1 fire on 3 of 4 tokens, latent 2 on 1, latent 3 on none.
    assert entropy(hand_built_sae(), HAND_X) == pytest.approx(3 * H_QUARTER, abs=1e-12)
    assert entropy_from_counts(np.array([2, 4, 0]), 4) == 1.0  # one latent half on; always/never: 0
    with pytest.raises(ValueError, match="the entropy of a set of 0 tokens is not defined"):
        entropy_from_counts(np.zeros(3), 0)


def test_the_feature_entropy_evaluator_reports_the_whole_set_and_the_batch_mean():
    import types

    from saejax.evaluation import EVALUATORS

    sae = hand_built_sae()
    inputs = types.SimpleNamespace(sae=sae, heldout_rows=lambda tokens: [HAND_X],
                                   config=types.SimpleNamespace(sae=types.SimpleNamespace(fire_threshold=0.0)))
    options = types.SimpleNamespace(tokens=4, batch=2)
    evaluator = EVALUATORS["feature_entropy"]()
    figures = evaluator.run(inputs, options)
    # Batch 1 (rows 0-1): latent 1 half on = 1 bit; batch 2 (rows 2-3): latents 0 and 2 = 2 bits.
    assert figures["entropy_bits"] == pytest.approx(3 * H_QUARTER, abs=1e-12)
    assert figures["batch_entropy_bits"] == 1.5 and figures["batches"] == 2 and figures["tokens"] == 4
    assert evaluator.headline(figures) == {"feature_entropy_bits": figures["entropy_bits"],
                                           "batch_feature_entropy_bits": 1.5}


def test_a_trained_bae_logs_its_entropy_and_saejax_eval_reports_the_held_out_one(tmp_path):
    from saejax.entropy import entropy
    from saejax.evaluation.inputs import EvalInputs
    from saejax.export import load_sae
    from saejax.trainer import train_and_evaluate

    cfg = config(**{"train.steps": 3, "eval.progress": False, "eval.feature_entropy.batch": 32,
                    "eval.feature_entropy.tokens": 128})
    run = str(tmp_path / "bae")
    results = train_and_evaluate(cfg, run)
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert all(0 < r["entropy_bits"] <= 256 for r in rows)  # the training metric, every step
    report = json.load(open(f"{run}/eval.json"))
    figures = report["evaluators"]["feature_entropy"]
    held = np.concatenate(list(EvalInputs(run, cfg, False).heldout_rows(128)))
    assert figures["entropy_bits"] == pytest.approx(entropy(load_sae(run), held), rel=1e-12)
    assert results["eval_metrics"]["feature_entropy_bits"] == figures["entropy_bits"]

"""The contract every SAE family keeps, tested over the whole registry.

For each family in saejax.models.FAMILIES, against its dense single-device
reference in tests/references/<family>.py:

* loss, gradients, fire counts and the new family state equal the reference on
  1 device and on 8 simulated devices (meshes 1x8, 2x4, 8x1);
* five training steps on every mesh equal the unsharded ones;
* the train step compiles once and donates its state;
* a run resumed from a checkpoint is bit-identical to one that was not
  interrupted (parameters, optimizer moments, firing counters, family state);
* the export read back by `load_sae` reconstructs like the trained model;
* the family trains from its defaults alone and recovers the synthetic dictionary.

A new family gets all of this by adding its reference module.
"""

import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import small_config, train_steps
from saejax.algorithms import FAMILY_STATE, get_algorithm
from saejax.config import load_config
from saejax.data import make_source
from saejax.data.pipeline import device_batch
from saejax.export import load_sae
from saejax.models import FAMILIES, get_family
from saejax.models.base import LossContext
from saejax.plan import batch_sharding
from saejax.sharding import make_mesh, named
from saejax.trainer import train_and_evaluate

NAMES = sorted(FAMILIES)
MESHES = [(1, 8), (2, 4), (8, 1)]
STEP = 3  # past every warm-up of the small configs, so penalties are switched on


def reference_module(name):
    return importlib.import_module(f"references.{name}")


def family_config(name, **overrides):
    return small_config(**{**reference_module(name).OVERRIDES, **overrides})


def test_every_family_has_a_reference():
    here = os.path.join(os.path.dirname(__file__), "references")
    missing = [name for name in NAMES if not os.path.exists(os.path.join(here, f"{name}.py"))]
    assert not missing, f"families without a dense reference in tests/references/: {missing}"


def _initial(config, family, seed=0):
    """Parameters and family state moved off their init, and a batch."""
    source = make_source(config)
    x = jnp.asarray(source.read(0, config.data.batch_size))
    params = family.init_params(jax.random.PRNGKey(seed), x)
    state = family.init_state(params, x)
    perturb = getattr(reference_module(family.name), "perturb", None)
    if perturb is not None:
        params, state = perturb(params, state, jax.random.PRNGKey(seed + 1))
    return params, state, x


def _place(mesh, specs, tree):
    return {name: jax.device_put(tree[name], named(mesh, spec.axes)) for name, spec in specs.items()}


@pytest.mark.parametrize("mesh_shape", [(1, 1)] + MESHES)
@pytest.mark.parametrize("name", NAMES)
def test_loss_gradients_and_state_equal_the_dense_reference(name, mesh_shape):
    config = family_config(name)
    mesh = make_mesh(*mesh_shape)
    family = get_family(config)
    params, state, x = _initial(config, family)
    dead = jnp.arange(family.n) % 3 == 0  # AuxK-style terms see dead latents
    step = jnp.asarray(STEP, jnp.int32)

    def loss(p, s, b, d):
        value, out = family.loss(p, s, b, LossContext(step=step, dead=d, mesh=mesh))
        return value, out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        _place(mesh, family.param_specs(), params), _place(mesh, family.state_specs(), state),
        jax.device_put(x, batch_sharding(mesh)), jax.device_put(dead, named(mesh, ("latent",))))
    ref = reference_module(name).reference(family, params, state, x, step, dead)
    ref_grads = jax.grad(lambda p: reference_module(name).reference(family, p, state, x, step, dead)["loss"])(params)

    np.testing.assert_allclose(value, ref["loss"], rtol=2e-5)
    for key in ref_grads:
        np.testing.assert_allclose(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(out.fire_counts, ref["fire_counts"])
    assert sorted(out.state) == sorted(ref["state"])
    for key in ref["state"]:
        np.testing.assert_allclose(out.state[key], ref["state"][key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert {"nmse", "l0"} <= set(out.metrics)


@pytest.mark.parametrize("name", NAMES)
def test_five_steps_sharded_equal_unsharded(name):
    config = family_config(name, **{"sae.dead_tokens": 128, "train.steps": 5})
    reference, ref_history = train_steps(config, (1, 1), 5)
    for mesh_shape in MESHES:
        state, history = train_steps(config, mesh_shape, 5)
        # float32 sums reduced in another order (psums, per-shard partial sums): ~1e-7 per step.
        for path, leaf, ref_leaf in _paired_leaves(state, reference):
            np.testing.assert_allclose(leaf, ref_leaf, rtol=1e-4, atol=1e-5, err_msg=f"{mesh_shape} {path}")
        for ref_m, m in zip(ref_history, history, strict=True):
            np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-4)
            np.testing.assert_allclose(m["l0"], ref_m["l0"], rtol=1e-3)


def _paired_leaves(tree, reference):
    """(path, leaf, reference leaf) of two trees that must have the same structure."""
    assert jax.tree.structure(tree) == jax.tree.structure(reference)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return list(zip(paths, jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_train_step_traces_once_and_donates_its_state(name):
    config = family_config(name)
    mesh = make_mesh(2, 4)
    algorithm = get_algorithm(get_family(config), config, mesh)
    traces = []

    def counted_step(state, batch):
        traces.append(1)
        return algorithm.train_step(state, batch)

    abstract = algorithm.abstract_state(config.sae.init_sample_rows)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    step_fn = jax.jit(counted_step, in_shardings=(shardings, batch_sharding(mesh)), donate_argnums=0)
    source = make_source(config)
    state = jax.jit(algorithm.init_state, out_shardings=shardings)(
        jax.random.PRNGKey(0), jnp.asarray(source.sample(config.sae.init_sample_rows)))
    for step in range(4):
        old = jax.tree.leaves(state["params"])[0]
        state, _ = step_fn(state, device_batch(source.read(step, 64), 64, batch_sharding(mesh)))
        assert old.is_deleted(), "state buffers must be donated to the step"
    assert len(traces) == 1 and step_fn._cache_size() == 1


def _checkpointed_state(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]


RESUME_OVERRIDES = {"train.steps": 6, "checkpoint.every_steps": 3, "checkpoint.keep_last": 5,
                    "sae.dead_tokens": 128, "mesh.model": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 6-step run per family (checkpoints at 3 and 6), shared by the tests below."""
    runs = {}

    def get(name):
        if name not in runs:
            workdir = str(tmp_path_factory.mktemp(f"{name}_uninterrupted"))
            config = family_config(name, **RESUME_OVERRIDES)
            runs[name] = (config, workdir, train_and_evaluate(config, workdir))
        return runs[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_checkpoint_is_bit_identical(name, trained, tmp_path):
    config, reference_dir, _ = trained(name)
    workdir = str(tmp_path / "resumed")
    shutil.copytree(reference_dir, workdir)
    for leftover in ("results.json", "cfg.json", "sae.safetensors"):
        os.remove(os.path.join(workdir, leftover))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # as if killed after the save at step 3
    train_and_evaluate(config, workdir)
    reference, resumed = _checkpointed_state(reference_dir, 6), _checkpointed_state(workdir, 6)
    if get_family(config).state_specs():
        assert FAMILY_STATE in resumed, "the family state is part of the checkpoint"
    for path, leaf, ref_leaf in _paired_leaves(resumed, reference):
        np.testing.assert_array_equal(leaf, ref_leaf, err_msg=path)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "elapsed_s")} for r in rows]  # noqa: E731
    rows = [strip([json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))])
            for d in (reference_dir, workdir)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[1]] == list(range(1, 7))


@pytest.mark.parametrize("name", NAMES)
def test_export_read_by_load_sae_reconstructs_like_the_trained_model(name, trained):
    config, workdir, results = trained(name)
    sae = load_sae(workdir)
    assert sae.cfg["family"] == name and sae.cfg["activation"]["kind"]
    assert sae.cfg["sparsity_control"] == results["sparsity_control"]
    mesh = make_mesh(1, 2)
    family = get_family(config)
    algorithm = get_algorithm(family, config, mesh)
    restored = _checkpointed_state(workdir, 6)
    params = algorithm.inference_params(jax.tree.map(jnp.asarray, restored))
    scale = results["normalization"]["scale"]
    x = make_source(config).read(0, config.data.batch_size, "eval")
    normalized = jnp.asarray(x * np.float32(scale))
    expected = family.decode(params, family.encode(params, normalized, mesh), mesh)
    np.testing.assert_allclose(sae.reconstruct(x, normalized=False) * np.float32(scale), expected,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sae.reconstruct(np.asarray(normalized), normalized=True), expected,
                               rtol=1e-5, atol=1e-5)
    # The held-out nmse of results.json is what the exported model gives on those rows.
    recon = sae.reconstruct(np.asarray(normalized), normalized=True)
    nmse = np.sum((normalized - recon) ** 2) / np.sum((normalized - normalized.mean(0)) ** 2)
    assert float(nmse) == pytest.approx(results["eval_metrics"]["nmse"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_trains_from_its_defaults_and_recovers_the_synthetic_dictionary(name, tmp_path):
    config = load_config("default", [("sae.family", name), ("mesh.model", "1"), ("train.progress", "false")])
    results = train_and_evaluate(config, str(tmp_path))
    held_out = results["eval_metrics"]
    assert results["feature_recovery_mmcs"] >= reference_module(name).RECOVERY, results["feature_recovery_mmcs"]
    low, high = getattr(reference_module(name), "L0_RANGE", (1, 128))
    assert held_out["nmse"] < 0.5 and low <= held_out["l0"] <= high, held_out
    assert results["family"] == name and results["l0"] == held_out["l0"]

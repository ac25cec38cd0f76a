"""Training behaviour: feature recovery, AuxK revives dead latents, NaN handling, outputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import small_config
from saejax.algorithms import get_algorithm
from saejax.checkpoint import Checkpointer
from saejax.config import load_config
from saejax.data import NpySource, make_source
from saejax.data.pipeline import device_batch, estimate_scale, host_batch
from saejax.errors import DataError, TrainingDivergedError
from saejax.export import load_sae
from saejax.models import get_family
from saejax.plan import batch_sharding, compile_train_step
from saejax.sharding import make_mesh
from saejax.trainer import train_and_evaluate


def test_default_config_recovers_the_true_dictionary(tmp_path):
    """d=64, 512 true features, a 1024-latent TopK SAE: mean max cosine >= 0.9 in ~15 s."""
    config = load_config("default", [("mesh.model", "1"), ("train.progress", "false")])
    results = train_and_evaluate(config, str(tmp_path))
    assert results["feature_recovery_mmcs"] >= 0.9
    assert results["eval_metrics"]["l0"] == pytest.approx(config.sae.topk.k, abs=0.1)
    assert results["final_train_metrics"]["dead_fraction"] == 0.0
    assert results["steps"] == 1500 and results["tokens_seen"] == 1500 * 1024
    # The exported SAE reproduces the evaluation with plain numpy.
    tensors, cfg = load_sae(str(tmp_path))
    source = make_source(config)
    x = source.read(0, 1024, "eval") * cfg["normalization"]["scale"]
    pre = (x - tensors["b_pre"]) @ tensors["W_enc"] + tensors["b_enc"]
    top = np.argpartition(-pre, cfg["k"], axis=1)[:, : cfg["k"]]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    recon = codes @ tensors["W_dec"] + tensors["b_pre"]
    nmse = np.sum((x - recon) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert nmse == pytest.approx(results["eval_metrics"]["nmse"], rel=0.05)


def _dead_fraction_after(auxk_coef, steps=200):
    """Half the dictionary starts dead (b_enc = -4, never in the top-k); train and report."""
    config = load_config("default", [("sae.auxk_coef", str(auxk_coef)), ("sae.dead_tokens", "10240"),
                                     ("mesh.model", "1")])
    mesh = make_mesh(1, 1)
    family = get_family(config)
    algorithm = get_algorithm(family, config, mesh)
    source = make_source(config)
    sample = source.sample(4096)
    scale = estimate_scale(sample)
    abstract = algorithm.abstract_state(sample.shape[0])
    state = jax.jit(algorithm.init_state, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(
        jax.random.PRNGKey(0), jnp.asarray(sample * scale))
    half = family.n // 2
    state["params"]["b_enc"] = state["params"]["b_enc"].at[half:].set(-4.0)
    state["tokens_since_fired"] = state["tokens_since_fired"].at[half:].set(config.sae.dead_tokens)
    step_fn = compile_train_step(algorithm, abstract, config.data.batch_size, mesh)
    for step in range(steps):
        batch = device_batch(host_batch(source, step, config.data.batch_size, scale), config.data.batch_size,
                             batch_sharding(mesh))
        state, metrics = step_fn(state, batch)
    return float(metrics["dead_fraction"]), float(metrics["auxk_loss"])


def test_auxk_revives_dead_latents():
    with_auxk, auxk_loss = _dead_fraction_after(1 / 32)
    without_auxk, zero = _dead_fraction_after(0.0)
    assert zero == 0.0 and auxk_loss > 0.0
    assert without_auxk >= 0.45, "without AuxK the dead half gets no gradient and stays dead"
    assert with_auxk <= 0.25, "AuxK trains dead latents on the residual until they fire again"


def _npy_run(tmp_path, data, name, **overrides):
    path = tmp_path / f"{name}.npy"
    np.save(path, data)
    config = small_config(**{"data.source": "npy", "data.path": str(path), "data.eval_fraction": 0.05,
                             "train.steps": 30, "checkpoint.every_steps": 5, "checkpoint.keep_last": 10, **overrides})
    return config, str(tmp_path / name)


def _first_step_using_row(config, row):
    source = NpySource.from_config(config)
    for step in range(config.train.steps):
        if row in source.row_ids(step, config.data.batch_size, "train", 0, config.data.batch_size):
            return step
    raise AssertionError("row never used")


def _clean_data(rows=1200, d=16):
    return np.random.default_rng(0).standard_normal((rows, d)).astype(np.float32)


def test_nan_in_data_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    clean = _clean_data()
    config, clean_dir = _npy_run(tmp_path, clean, "clean")
    train_and_evaluate(config, clean_dir)

    # Poison a training row first used around step 12 (after the step-10 checkpoint).
    probe = NpySource.from_config(config)
    sample = probe.sample(config.sae.init_sample_rows)
    target = next(r for r in probe.train_rows
                  if _first_step_using_row(config, r) >= 12 and not np.all(sample == clean[r], axis=1).any())
    bad_step = _first_step_using_row(config, target)
    poisoned = clean.copy()
    poisoned[target, 3] = np.nan
    bad_config, bad_dir = _npy_run(tmp_path, poisoned, "poisoned")
    with pytest.raises(DataError, match=f"train batch for step {bad_step} .* contains NaN/inf"):
        train_and_evaluate(bad_config, bad_dir)

    good = Checkpointer(os.path.join(bad_dir, "checkpoints"))
    last = good.latest_step()
    assert last == (bad_step // 5) * 5
    # Intact: identical to the clean run's checkpoint of the same step.
    _, abstract = _abstract(bad_config)
    restored, meta = good.restore(last, abstract)
    reference = Checkpointer(os.path.join(clean_dir, "checkpoints"))
    clean_state, _ = reference.restore(last, abstract)
    assert meta["step"] == last
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(clean_state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not os.path.exists(os.path.join(bad_dir, "results.json"))
    good.close()
    reference.close()


def _abstract(config):
    mesh = make_mesh(1, 1)
    algorithm = get_algorithm(get_family(config), config, mesh)
    return algorithm, algorithm.abstract_state(config.sae.init_sample_rows)


def test_divergence_stops_before_saving(tmp_path):
    data = _clean_data()
    config, _ = _npy_run(tmp_path, data, "probe", **{"data.normalize": False})
    probe = NpySource.from_config(config)
    sample = probe.sample(config.sae.init_sample_rows)
    target = next(r for r in probe.train_rows
                  if _first_step_using_row(config, r) >= 7 and not np.all(sample == data[r], axis=1).any())
    batch_index = _first_step_using_row(config, target)
    data[target] = 1e25  # finite input whose squares overflow float32: the loss is NaN
    config, workdir = _npy_run(tmp_path, data, "diverging", **{"data.normalize": False})
    last_good = (batch_index // 5) * 5  # batch b is trained on by step b + 1
    with pytest.raises(TrainingDivergedError, match=rf"training diverged at step {batch_index + 1}: loss=nan.*"
                                                    rf"The last good checkpoint, step {last_good} in .* is intact"):
        train_and_evaluate(config, workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == last_good
    restored, _ = ckpt.restore(last_good, _abstract(config)[1])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored))
    ckpt.close()


def test_outputs_of_a_run(tmp_path):
    config = small_config(**{"mesh.model": 8, "optim.ema_decay": 0.9, "train.steps": 6, "train.log_every": 2})
    results = train_and_evaluate(config, str(tmp_path))
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["steps"] == 6 and on_disk["tokens_seen"] == 6 * 64
    assert on_disk["config"]["sae"]["n"] == 256
    assert on_disk["total_flops"] == pytest.approx(6 * on_disk["flops_per_step"])
    assert set(on_disk["eval_metrics"]) >= {"nmse", "l0", "explained_variance"}
    assert on_disk["plan"]["mesh_shape"] == {"data": 1, "model": 8}
    assert 0 < on_disk["feature_recovery_mmcs"] <= 1
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert set(rows[0]) >= {"nmse", "auxk_loss", "l0", "dead_fraction", "grad_norm", "loss", "lr", "tokens_per_sec"}
    # sae.safetensors holds the EMA weights (the 8-way sharded W_enc written shard by shard).
    tensors, cfg = load_sae(str(tmp_path))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    mesh = make_mesh(1, 8)
    algorithm = get_algorithm(get_family(config), config, mesh)
    state, _ = ckpt.restore(6, algorithm.abstract_state(config.sae.init_sample_rows))
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        np.testing.assert_array_equal(tensors[name], np.asarray(state["ema_params"][name]))
    assert cfg["weights"] == "ema" and cfg["d"] == 16 and cfg["n"] == 256 and cfg["k"] == 8
    assert cfg["layout"]["W_enc"] == ["d", "n"] and cfg["normalization"]["scale"] == results["normalization"]["scale"]
    ckpt.close()

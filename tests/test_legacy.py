"""Runs written before families owned their config groups still load, resume and export.

tests/fixtures/legacy_topk_run was written by saejax at d95d501, when TopK's keys sat directly
under `sae` (see its README.txt). Its checkpoint meta, results.json and cfg.json are in that layout.
"""

import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, run_cli
from saejax.config import active_tree, config_from_dict, load_config
from saejax.errors import ConfigError
from saejax.export import load_sae
from saejax.sweep.study import config_hash
from saejax.trainer import check_resumable, train_and_evaluate

FIXTURE = os.path.join(REPO, "tests", "fixtures", "legacy_topk_run")
LEGACY_HASH = "5e3f18c5efbf"  # what config_hash gave this run before the family interface


def _saved_config():
    with open(os.path.join(FIXTURE, "results.json")) as f:
        return json.load(f)["config"]


def _state(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_a_legacy_config_dict_is_migrated_into_the_family_group():
    saved = _saved_config()
    assert "k" in saved["sae"] and "topk" not in saved["sae"]  # the old layout
    config = config_from_dict(saved)
    assert (config.sae.topk.k, config.sae.topk.k_aux, config.sae.n) == (4, 8, 64)
    # Identity and sweep hash are unchanged by the new layout.
    assert active_tree(saved) == active_tree(config)
    assert config_hash(config, "/nonexistent") == LEGACY_HASH
    check_resumable(saved, config)  # no error


def test_resuming_a_legacy_checkpoint_with_another_k_names_the_key():
    config = config_from_dict({**_saved_config(), "sae": {**_saved_config()["sae"], "k": 5}})
    with pytest.raises(ConfigError, match=r"\(sae\.topk\.k: checkpoint 4 vs now 5\)\. Use a fresh --workdir"):
        check_resumable(_saved_config(), config)


def test_a_legacy_run_resumes_bit_identically_with_todays_code(tmp_path):
    """Resume the old run from its step-3 checkpoint: step 6 equals the one the old code wrote."""
    workdir = str(tmp_path / "run")
    shutil.copytree(FIXTURE, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    for name in ("results.json", "cfg.json", "sae.safetensors"):
        os.remove(os.path.join(workdir, name))
    results = train_and_evaluate(config_from_dict(_saved_config()), workdir)
    assert results["steps"] == 6
    old, new = _state(FIXTURE, 6), _state(workdir, 6)
    flat_old = {k: v for k, v in _flatten(old)}
    flat_new = {k: v for k, v in _flatten(new)}
    assert sorted(flat_old) == sorted(flat_new)
    for key, value in flat_old.items():
        np.testing.assert_array_equal(flat_new[key], value, err_msg=key)


def test_a_legacy_config_file_setting_sae_k_trains(tmp_path):
    path = tmp_path / "old_style.py"
    path.write_text(
        "from saejax.config import base_config\n\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.sae.d, c.sae.n, c.sae.k, c.sae.k_aux = 16, 64, 4, 8\n"
        "    return c\n")
    config = load_config(str(path))
    assert (config.sae.topk.k, config.sae.topk.k_aux) == (4, 8)
    result = run_cli("train", "--config", str(path), "--config.train.steps=3", "--config.mesh.model=1",
                     "--config.sae.init_sample_rows=256", "--config.data.batch_size=32",
                     "--config.train.progress=false", "--workdir", str(tmp_path / "w"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "L0 4.00" in result.stdout


def test_a_legacy_export_loads_and_reconstructs():
    sae = load_sae(FIXTURE)
    assert isinstance(sae.cfg["activation"], str)  # "topk_relu": the old, prose-only description
    assert sae.family.name == "topk" and sae.family.k == 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16)).astype(np.float32)
    t = sae.tensors
    pre = (x * sae.scale - t["b_pre"]) @ t["W_enc"] + t["b_enc"]
    top = np.argsort(-pre, axis=1)[:, :4]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    expected = (codes @ t["W_dec"] + t["b_pre"]) / sae.scale
    np.testing.assert_allclose(sae.reconstruct(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.dense_codes(x), codes, rtol=1e-5, atol=1e-6)
    tensors, cfg = load_sae(FIXTURE)  # unpacks as before
    assert cfg["k"] == 4 and tensors["W_enc"].shape == (16, 64)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flatten(value, f"{prefix}/{i}")
    else:
        yield prefix, np.asarray(tree)

"""Checkpoints: kept steps, atomicity, restore onto another mesh shape."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from helpers import small_config
from saejax.algorithms import get_algorithm
from saejax.checkpoint import Checkpointer
from saejax.models import get_family
from saejax.sharding import make_mesh


def _state_on(mesh_shape, config):
    mesh = make_mesh(*mesh_shape)
    algorithm = get_algorithm(get_family(config), config, mesh)
    abstract = algorithm.abstract_state(64)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    sample = jax.random.normal(jax.random.PRNGKey(1), (64, config.sae.d))
    state = jax.jit(algorithm.init_state, out_shardings=shardings)(jax.random.PRNGKey(0), sample)
    # Make every leaf distinctive so a mixed-up shard would show.
    state["params"]["b_enc"] = jax.device_put(jnp.arange(config.sae.n, dtype=jnp.float32), shardings["params"]["b_enc"])
    return state, abstract


def test_restore_onto_other_mesh_shapes(tmp_path):
    config = small_config()
    state, _ = _state_on((1, 8), config)
    ckpt = Checkpointer(str(tmp_path), async_save=True)
    ckpt.save(7, state, {"note": "saved on 1x8"})
    ckpt.wait()
    expected = jax.device_get(state)
    for mesh_shape in [(2, 4), (8, 1), (1, 1)]:
        _, abstract = _state_on(mesh_shape, config)
        restored, meta = ckpt.restore(7, abstract)
        assert meta == {"note": "saved on 1x8"}
        for got, want, target in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(abstract), strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)
            assert got.sharding == target.sharding
    ckpt.close()


def test_keep_last_and_keep_every(tmp_path):
    config = small_config()
    state, _ = _state_on((1, 1), config)
    ckpt = Checkpointer(str(tmp_path), keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 11):
        ckpt.save(step, state, {})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9, 10]
    ckpt.close()


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    config = small_config()
    state, abstract = _state_on((1, 1), config)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(5, state, {"step": 5})
    ckpt.close()
    # What a process killed mid-save leaves: orbax writes into a temporary
    # directory and renames it only when the step is complete.
    partial = tmp_path / "9.orbax-checkpoint-tmp-1730000000"
    shutil.copytree(tmp_path / "5", partial)
    for leaf in partial.rglob("*"):
        if leaf.is_file() and leaf.stat().st_size > 0:
            leaf.write_bytes(b"garbage")
    reopened = Checkpointer(str(tmp_path), async_save=False)
    assert reopened.latest_step() == 5
    restored, meta = reopened.restore(5, abstract)
    assert meta == {"step": 5}
    np.testing.assert_array_equal(np.asarray(restored["params"]["W_dec"]), np.asarray(state["params"]["W_dec"]))
    reopened.close()
    assert not os.path.exists(partial), "leftovers of an interrupted save are cleaned up"

"""Shared test utilities: small configs and a dense reference TopK SAE."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from saejax.config import base_config, family_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
    """A tiny TopK config on synthetic data; overrides as dotted keys (`sae.k` = the family's k)."""
    config = base_config()
    config.sae.family = overrides.pop("sae.family", "topk")  # first: the family's short keys resolve to it
    config.sae.d = 16
    config.sae.n = 256
    if config.sae.family == "topk":  # another family's run refuses TopK keys changed from their defaults
        config.sae.topk.k = 8
        config.sae.topk.k_aux = 16
    config.sae.init_sample_rows = 512
    config.data.batch_size = 64
    config.data.synthetic.num_features = 64
    config.data.synthetic.avg_active = 4.0
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 2
    config.train.steps = 5
    config.train.log_every = 1
    config.train.eval_batches = 1
    config.train.progress = False
    config.checkpoint.every_steps = 0
    config.checkpoint.async_save = False
    config.mesh.data = 1
    config.mesh.model = 1
    for key, value in overrides.items():
        key = family_key(config, key)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.lock()
    return config


def dense_reference_loss(params, x, dead, k, k_aux, auxk_coef, multi_k=None, multi_coef=0.0):
    """The TopK SAE loss written the obvious way: dense codes, lax.top_k over all latents."""
    pre = (x - params["b_pre"]) @ params["W_enc"] + params["b_enc"]
    rows = jnp.arange(x.shape[0])[:, None]

    def codes(values, indices):
        return jnp.zeros_like(pre).at[rows, indices].set(jax.nn.relu(values))

    def nmse(a, r):
        return jnp.sum((a - r) ** 2) / jnp.sum((a - a.mean(0)) ** 2)

    recon = codes(*jax.lax.top_k(pre, k)) @ params["W_dec"] + params["b_pre"]
    loss = nmse(x, recon)
    if multi_k:
        loss = loss + multi_coef * nmse(x, codes(*jax.lax.top_k(pre, multi_k)) @ params["W_dec"] + params["b_pre"])
    if k_aux:
        residual = jax.lax.stop_gradient(x - recon)
        aux_codes = codes(*jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), k_aux))
        aux = jnp.where(dead.any(), nmse(residual, aux_codes @ params["W_dec"]), 0.0)
        loss = loss + auxk_coef * aux
    return loss


def train_steps(config, mesh_shape, steps):
    """(final state on the host, per-step metrics) of `steps` compiled train steps on a fresh state."""
    from saejax.algorithms import get_algorithm
    from saejax.data import make_source
    from saejax.data.pipeline import device_batch, host_batch
    from saejax.models import get_family
    from saejax.plan import batch_sharding, compile_train_step
    from saejax.sharding import make_mesh

    mesh = make_mesh(*mesh_shape)
    algorithm = get_algorithm(get_family(config), config, mesh)
    source = make_source(config)
    abstract = algorithm.abstract_state(config.sae.init_sample_rows)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    sample = jnp.asarray(source.sample(config.sae.init_sample_rows))
    state = jax.jit(algorithm.init_state, out_shardings=shardings)(jax.random.PRNGKey(0), sample)
    step_fn = compile_train_step(algorithm, abstract, config.data.batch_size, mesh)
    history = []
    for step in range(steps):
        batch = device_batch(host_batch(source, step, config.data.batch_size, 1.0), config.data.batch_size,
                             batch_sharding(mesh))
        state, metrics = step_fn(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def run_cli(*args, env=None, timeout=600, **kwargs):
    """Run `python -m saejax ARGS` in a fresh process (its own device count)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full_env.pop("XLA_FLAGS", None)  # the test process's simulated devices are not inherited
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "saejax", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO, **kwargs)

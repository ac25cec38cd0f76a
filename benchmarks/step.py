"""Train-step time against the encoder matmul alone, measured in the same run.

    python benchmarks/step.py                 # d=768, n=16384, k=32, B=4096, AuxK on
    python benchmarks/step.py --n 32768

The encoder matmul (x @ W_enc + b_enc, same shapes, jitted) is the floor any
TopK SAE step pays; the ratio says how much the rest of the step (top-k,
sparse decode, sparse backward, Adam, decoder renormalisation) adds. Step and
matmul are timed alternately, `--reps` times each after a warm-up, and the
medians compared. The last line is `step/encoder_matmul = X.XX` for a fresh
state (nothing dead yet, so AuxK contributes nothing, as at the start of any
run); a line before it gives the ratio with `--dead-fraction` of the latents
dead, where AuxK's top-k_aux, decode and backward run every step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from saejax.algorithms import get_algorithm  # noqa: E402
from saejax.config import base_config  # noqa: E402
from saejax.models import get_family  # noqa: E402
from saejax.plan import batch_sharding, compile_train_step  # noqa: E402
from saejax.sharding import make_mesh  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def build(d: int, n: int, k: int, batch: int, dead_fraction: float = 0.0):
    """(compiled step, fresh state, a random batch, mesh, config) for one device."""
    config = base_config()
    config.sae.d, config.sae.n, config.sae.topk.k = d, n, k
    config.data.batch_size = batch
    config.mesh.model = 1
    mesh = make_mesh(1, 1)
    family = get_family(config)
    algorithm = get_algorithm(family, config, mesh)
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (batch, d)), batch_sharding(mesh))
    abstract = algorithm.abstract_state(batch)
    state = jax.jit(algorithm.init_state, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(
        jax.random.PRNGKey(0), x)
    if dead_fraction:
        dead = jnp.arange(n) >= n - int(n * dead_fraction)
        state["tokens_since_fired"] = jnp.where(dead, config.sae.dead_tokens, 0).astype(jnp.int32)
        # Dead latents stay dead: they lose every top-k (as dead latents do).
        state["params"]["b_enc"] = jnp.where(dead, -10.0, 0.0)
    return compile_train_step(algorithm, abstract, batch, mesh), state, x, mesh, config


def measure(d: int, n: int, k: int, batch: int, reps: int, dead_fraction: float) -> tuple[float, float, float]:
    """(median step seconds, median matmul seconds, dead fraction seen) on one device."""
    step, state, x, _, _ = build(d, n, k, batch, dead_fraction)
    w_enc, b_enc = jnp.array(state["params"]["W_enc"]), jnp.array(state["params"]["b_enc"])
    encoder = jax.jit(lambda x, w, b: x @ w + b)

    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step(holder["state"], x)
        return metrics

    for _ in range(2):  # warm-up: compilation, first-touch page faults
        _timed(run_step)
        _timed(lambda: encoder(x, w_enc, b_enc))
    step_times, matmul_times = [], []
    for _ in range(reps):
        step_times.append(_timed(run_step))
        matmul_times.append(_timed(lambda: encoder(x, w_enc, b_enc)))
    seen_dead = float(run_step()["dead_fraction"])
    return float(np.median(step_times)), float(np.median(matmul_times)), seen_dead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dead-fraction", type=float, default=0.1)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; d={args.d} n={args.n} k={args.k} "
          f"B={args.batch}, AuxK on (k_aux={get_family_k_aux(args)}), median of {args.reps}")
    fresh_step, fresh_matmul, _ = measure(args.d, args.n, args.k, args.batch, args.reps, 0.0)
    if args.dead_fraction:
        s, m, dead = measure(args.d, args.n, args.k, args.batch, args.reps, args.dead_fraction)
        print(f"with {dead:.1%} of latents dead (AuxK active): step {s * 1e3:.1f} ms, encoder matmul "
              f"{m * 1e3:.1f} ms, step/encoder_matmul (AuxK active) = {s / m:.2f}")
    print(f"fresh state (no dead latents): step {fresh_step * 1e3:.1f} ms, encoder matmul {fresh_matmul * 1e3:.1f} ms")
    print(f"step/encoder_matmul = {fresh_step / fresh_matmul:.2f}")


def get_family_k_aux(args) -> int:
    config = base_config()
    config.sae.d, config.sae.n, config.sae.topk.k = args.d, args.n, args.k
    return get_family(config).k_aux


if __name__ == "__main__":
    main()

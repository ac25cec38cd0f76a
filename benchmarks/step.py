"""Train-step time against the encoder matmul alone, measured in the same run, for any family.

    python benchmarks/step.py                         # TopK, d=768, n=16384, k=32, B=4096, AuxK on
    python benchmarks/step.py --family relu
    python benchmarks/step.py --family all            # every registered family, one table
    python benchmarks/step.py --n 32768

The encoder matmul (x @ W_enc + b_enc, same shapes, jitted) is the floor any
SAE step pays; the ratio says how much the rest of the step (activation or
top-k, decode, backward, Adam, constraints) adds. Step and matmul are timed
alternately, `--reps` times each after a warm-up, and the medians compared.

Families without a k (ReLU+L1, JumpReLU, Gated, ProLU) are benchmarked at the
matching L0: their encoder bias (`b_gate` for Gated, else `b_enc`) is shifted
so that about k latents per token are active on the benchmark batch, since a
freshly initialised ReLU dictionary fires on half its latents and would time
a step no trained SAE takes. The measured L0 is printed with each ratio.

For TopK the last line is `step/encoder_matmul = X.XX` for a fresh state
(nothing dead, AuxK contributes nothing); a line before it gives the ratio
with `--dead-fraction` of the latents dead, where AuxK's top-k_aux, decode and
backward run every step.
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

from saejax.algorithms import FIRING, get_algorithm  # noqa: E402
from saejax.config import base_config, set_value  # noqa: E402
from saejax.models import FAMILIES, get_family  # noqa: E402
from saejax.plan import batch_sharding, compile_train_step  # noqa: E402
from saejax.sharding import make_mesh  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def make_config(family: str, d: int, n: int, k: int, batch: int):
    config = base_config()
    set_value(config, "sae.family", family)
    config.sae.d, config.sae.n = d, n
    if FAMILIES[family].has_k:
        set_value(config, f"sae.{family}.{FAMILIES[family].sparsity_key}", k)
    config.data.batch_size = batch
    config.mesh.model = 1
    return config


def _bias_name(params) -> str:
    return "b_gate" if "b_gate" in params else "b_enc"


def build(d: int, n: int, k: int, batch: int, dead_fraction: float = 0.0, family: str = "topk"):
    """(compiled step, fresh state, a random batch, mesh, config) for one device."""
    config = make_config(family, d, n, k, batch)
    mesh = make_mesh(1, 1)
    sae = get_family(config)
    algorithm = get_algorithm(sae, config, mesh)
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (batch, d)), batch_sharding(mesh))
    abstract = algorithm.abstract_state(batch)
    state = jax.jit(algorithm.init_state, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(
        jax.random.PRNGKey(0), x)
    params = state["params"]
    bias = _bias_name(params)
    if not sae.has_k:  # about k active latents per token: shift the bias to the (1 - k/n) quantile
        pre = np.asarray(x @ params["W_enc"])
        params[bias] = params[bias] - float(np.quantile(pre, 1 - k / n))
    if dead_fraction:
        dead = jnp.arange(n) >= n - int(n * dead_fraction)
        state[FIRING] = jnp.where(dead, config.sae.dead_tokens, 0).astype(jnp.int32)
        # Dead latents stay dead: they lose every top-k (as dead latents do).
        params[bias] = jnp.where(dead, -10.0, params[bias])
    return compile_train_step(algorithm, abstract, batch, mesh), state, x, mesh, config


def measure(d: int, n: int, k: int, batch: int, reps: int, dead_fraction: float,
            family: str = "topk") -> tuple[float, float, float, float]:
    """(median step s, median matmul s, dead fraction seen, L0 seen) on one device."""
    step, state, x, _, _ = build(d, n, k, batch, dead_fraction, family)
    w_enc = jnp.array(state["params"]["W_enc"])
    b_enc = jnp.array(state["params"][_bias_name(state["params"])])
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
    metrics = jax.device_get(run_step())
    return (float(np.median(step_times)), float(np.median(matmul_times)),
            float(metrics["dead_fraction"]), float(metrics["l0"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="topk", help=f"one of {', '.join(sorted(FAMILIES))}, or all")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dead-fraction", type=float, default=0.1, help="TopK only: AuxK-active variant")
    args = parser.parse_args()
    families = sorted(FAMILIES) if args.family == "all" else [args.family]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r}; the families are: {', '.join(sorted(FAMILIES))}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; d={args.d} n={args.n} k={args.k} "
          f"B={args.batch}, median of {args.reps}")
    ratios = {}
    for family in families:
        s, m, _, l0 = measure(args.d, args.n, args.k, args.batch, args.reps, 0.0, family)
        ratios[family] = s / m
        print(f"{family}: L0 {l0:.1f}, step {s * 1e3:.1f} ms, encoder matmul {m * 1e3:.1f} ms, "
              f"{family} step/encoder_matmul = {s / m:.2f}")
    if args.family == "topk":
        if args.dead_fraction:
            s, m, dead, _ = measure(args.d, args.n, args.k, args.batch, args.reps, args.dead_fraction)
            k_aux = get_family(make_config("topk", args.d, args.n, args.k, args.batch)).k_aux
            print(f"with {dead:.1%} of latents dead (AuxK active, k_aux={k_aux}): step {s * 1e3:.1f} ms, "
                  f"encoder matmul {m * 1e3:.1f} ms, step/encoder_matmul (AuxK active) = {s / m:.2f}")
        print(f"step/encoder_matmul = {ratios['topk']:.2f}")


if __name__ == "__main__":
    main()

"""PAM-SGD's decoder solve and encoder phase against the encoder matmul, measured in the same run.

    python benchmarks/pam.py                 # TopK, d=768, n=16384, k=32, B=4096, block 4 batches, 4 encoder steps
    python benchmarks/pam.py --block-batches 16 --encoder-steps 16

On one device: a block of `--block-batches` random batches is encoded and accumulated by the
train step itself (its accumulation phase), then

* the decoder solve (CG to train.pam_sgd.cg_tol, matrix-free over the block's codes) is timed
  alone, from the accumulated statistics, and reported with its CG iterations;
* one encoder phase (`--encoder-steps` train steps in the encoder phase) is timed;
* one accumulation step is timed (median over the block);

each as a ratio to the encoder matmul (x @ W_enc + b_enc on one batch, jitted), timed
alternately with them; medians of `--reps`.
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
from saejax.config import base_config, set_value  # noqa: E402
from saejax.models import get_family  # noqa: E402
from saejax.plan import batch_sharding, compile_train_step  # noqa: E402
from saejax.sharding import make_mesh  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--block-batches", type=int, default=4)
    parser.add_argument("--encoder-steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rho", type=float, default=1e-4)
    args = parser.parse_args()

    config = base_config()
    config.sae.d, config.sae.n = args.d, args.n
    set_value(config, "sae.topk.k", args.k)
    config.data.batch_size = args.batch
    config.mesh.model = 1
    config.train.algorithm = "pam_sgd"
    config.train.pam_sgd.block_tokens = args.block_batches * args.batch
    config.train.pam_sgd.encoder_steps = args.encoder_steps
    config.train.pam_sgd.rho = args.rho
    mesh = make_mesh(1, 1)
    algorithm = get_algorithm(get_family(config), config, mesh)
    rng = jax.random.PRNGKey(1)
    batches = [jax.device_put(jax.random.normal(jax.random.fold_in(rng, i), (args.batch, args.d)),
                              batch_sharding(mesh)) for i in range(4)]
    abstract = algorithm.abstract_state(args.batch)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    state = jax.jit(algorithm.init_state, out_shardings=shardings)(jax.random.PRNGKey(0), batches[0])
    step = compile_train_step(algorithm, abstract, args.batch, mesh)
    solve = jax.jit(algorithm.solve_decoder)
    w_enc, b_enc = jnp.array(state["params"]["W_enc"]), jnp.array(state["params"]["b_enc"])
    encoder = jax.jit(lambda x, w, b: x @ w + b)
    matmul = lambda: encoder(batches[0], w_enc, b_enc)  # noqa: E731

    holder = {"state": state}

    def run_steps(count, offset=0):
        metrics = None
        for i in range(count):
            holder["state"], metrics = step(holder["state"], batches[(offset + i) % len(batches)])
        return metrics

    # Accumulate all but the last batch of the block (the last step would solve and reset them).
    for _ in range(2):
        _timed(matmul)
    accumulate_times, matmul_times = [], []
    for i in range(args.block_batches - 1):
        accumulate_times.append(_timed(lambda: run_steps(1, i)))
        matmul_times.append(_timed(matmul))
    s = holder["state"]
    frozen = (jax.tree.map(jnp.array, s["acc"]), jnp.array(s["codes"]["values"]),
              jnp.array(s["codes"]["indices"]), jnp.array(s["params"]["W_dec"]))
    solve = solve.lower(*frozen).compile()
    iterations = int(solve(*frozen)[2])  # warm-up, and the iterations this block needs
    solve_times = []
    for _ in range(args.reps):
        solve_times.append(_timed(lambda: solve(*frozen)))
        matmul_times.append(_timed(matmul))
    run_steps(1, args.block_batches - 1)  # the solve step (every branch is compiled already)
    phase_times = [_timed(lambda: run_steps(args.encoder_steps))]  # the block's encoder phase
    matmul_times.append(_timed(matmul))
    mm = float(np.median(matmul_times))
    sv, ph, ac = float(np.median(solve_times)), phase_times[0], float(np.median(accumulate_times))
    tokens = args.block_batches * args.batch
    print(f"PAM-SGD d={args.d} n={args.n:,} k={args.k} B={args.batch}: block {tokens:,} tokens, "
          f"{args.encoder_steps} encoder steps, rho {args.rho:g}; on {jax.devices()[0].platform}")
    print(f"  encoder matmul        {mm * 1e3:9.1f} ms")
    print(f"  accumulation step     {ac * 1e3:9.1f} ms   {ac / mm:7.2f} x matmul")
    print(f"  decoder solve         {sv * 1e3:9.1f} ms   {sv / mm:7.2f} x matmul  ({iterations} CG iterations, "
          f"{sv / max(iterations, 1) / mm:.2f} x matmul each)")
    print(f"  encoder phase         {ph * 1e3:9.1f} ms   {ph / mm:7.2f} x matmul  "
          f"({ph / args.encoder_steps / mm:.2f} x matmul per step)")
    print(f"decoder_solve/encoder_matmul = {sv / mm:.2f}")
    print(f"encoder_phase/encoder_matmul = {ph / mm:.2f}")


if __name__ == "__main__":
    main()

"""Many SAEs from one pass over the data against separate runs, measured in the same run.

    python benchmarks/one_pass.py                      # 6 runs: n = 256, 512, 1024 x k = 8, 32
    python benchmarks/one_pass.py --steps 600 --repeats 2

Writes a store of random d=384 activations (MiniLM's width) with the harvest's
writer and a study over it, then runs the same grid twice through
`saejax sweep`, each time in a fresh sweep directory:
  - separate: one worker process per run (the default), each reading the data;
  - one pass: `--one-pass`, one process training every run on one stream of batches.
Both arms train bit-identical SAEs (tests/test_sweep.py checks it); what
differs is the work done once per job instead of once per run: process
start, the store's reads and shuffles, the initialisation sample, and the
metrics/step bookkeeping. The arms alternate when --repeats > 1 and the
medians are compared. The last line is `one_pass/separate = X.XX` (wall
time; below 1 is a saving).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reader import write_store  # noqa: E402  (benchmarks/reader.py: a random store through the writer)

STUDY = '''
from saejax.config import base_config

def get_config():
    c = base_config()
    c.sae.d = {d}
    c.sae.init_sample_rows = 8192
    c.data.source = "store"
    c.data.path = {store!r}
    c.data.batch_size = {batch}
    c.optim.warmup_steps = 50
    c.train.steps = {steps}
    c.train.log_every = 50
    c.train.eval_batches = 2
    c.train.progress = False
    c.checkpoint.every_steps = 0
    c.mesh.model = 1
    return c

def get_hyper(h):
    return h.product([h.sweep("sae.k", {ks}), h.sweep("sae.n", {ns})])
'''


def sweep(study: str, workdir: str, one_pass: bool) -> float:
    command = [sys.executable, "-m", "saejax", "sweep", study, "--workdir", workdir] + (["--one-pass"] if one_pass else [])
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=131_072)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        write_store(store, args.d, args.tokens, "float32")
        study = os.path.join(tmp, "study.py")
        with open(study, "w") as f:
            f.write(STUDY.format(d=args.d, store=store, batch=args.batch, steps=args.steps, ks=args.k, ns=args.n))
        runs = len(args.n) * len(args.k)
        times: dict[str, list[float]] = {"separate": [], "one pass": []}
        for repeat in range(args.repeats):
            for arm, one_pass in (("separate", False), ("one pass", True)):
                times[arm].append(sweep(study, os.path.join(tmp, f"{arm.replace(' ', '_')}{repeat}"), one_pass))
                print(f"{arm:>9}: {runs} runs x {args.steps} steps of {args.batch} tokens in {times[arm][-1]:.1f}s", flush=True)
        separate, one_pass = statistics.median(times["separate"]), statistics.median(times["one pass"])
        print(f"grid n={args.n} x k={args.k}, d={args.d}: separate {separate:.1f}s, one pass {one_pass:.1f}s, "
              f"saved {separate - one_pass:.1f}s ({(separate - one_pass) / runs:.1f}s per run)")
        print(f"one_pass/separate = {one_pass / separate:.2f}")


if __name__ == "__main__":
    main()

"""PAM-SGD against Adam on MiniLM's residual stream: held-out nmse against tokens seen and
wall-clock, at fractions of the store, and L0 / dense fraction for ReLU+L1 under both.

  python experiments/pam_minilm.py --store runs/minilm/acts --workdir runs/pam_minilm

The store's training rows (a fixed permutation) are written once as .npy files: the first
`fraction` of them for each fraction, all scaled to E||x||^2 = d with the scale of the whole
training set (data.normalize=false, so every run sees the same units); the held-out rows are the
store's eval split, never trained on. Every run trains the same number of steps of the same batch
size (so the same tokens seen): at 1% of the store that is many passes over few rows, the
low-data regime of the SplInterp paper. Checkpoints every `--every` steps are evaluated on the
held-out rows through the family's inference encode/decode.

Configurations (n=1024, d=384, batch 1024, lr 1e-3 for both algorithms' Adam):
  topk        TopK k=16 (Gao et al.'s: ReLU'd top-k, b_pre subtracted, AuxK on for Adam)
  topk_ref    the reference's TopK: k largest |pre| with signs, no pre-bias, inputs z-scored per
              dimension (AuxK off: it has none)
  relu        ReLU + decoder-norm L1 (l1_coef 3)
PAM-SGD: blocks of 8 batches (8192 tokens), 8 encoder steps per block, rho 1e-4, mu_enc = nu_enc =
1e-3 (the reference's), CG to 1e-4. AuxK is off for both on topk_ref, on for both on topk (the
encoder phase runs the family's own loss).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FRACTIONS = (0.01, 0.1, 1.0)
RELU_FRACTIONS = (1.0,)


def build_data(store: str, out: str) -> dict:
    """npy files of the training rows (per fraction, two normalisations) and the held-out rows."""
    from saejax.data.store import StoreSource

    meta_path = os.path.join(out, "data.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    os.makedirs(out, exist_ok=True)
    source = StoreSource(store, 384, seed=0, eval_fraction=0.02)
    rows = source.split_rows()
    train = source.read(0, rows["train"], "train").astype(np.float32)
    held = source.read(0, rows["eval"], "eval").astype(np.float32)
    scale = float(np.sqrt(train.shape[1] / np.mean(np.sum(train**2, axis=1))))
    mean, std = train.mean(0), train.std(0) + 1e-6
    files = {}
    for kind, fn in (("scaled", lambda a: a * scale), ("zscored", lambda a: (a - mean) / std)):
        np.save(os.path.join(out, f"eval_{kind}.npy"), fn(held))
        for fraction in FRACTIONS:
            count = max(1024, int(round(fraction * len(train))))
            path = os.path.join(out, f"train_{kind}_{fraction:g}.npy")
            np.save(path, fn(train[:count]))
            files[f"{kind}_{fraction:g}"] = {"path": path, "rows": count}
    meta = {"files": files, "train_rows": len(train), "eval_rows": len(held), "scale": scale}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def make_config(variant: str, algorithm: str, data_path: str, steps: int, every: int):
    from saejax.config import base_config, set_value

    c = base_config()
    family = "relu" if variant == "relu" else "topk"
    set_value(c, "sae.family", family)
    c.sae.d, c.sae.n = 384, 1024
    c.sae.dead_tokens = 250_000
    c.sae.init_sample_rows = 1024
    if family == "topk":
        c.sae.topk.k = 16
    if variant == "topk_ref":
        c.sae.topk.abs_select, c.sae.topk.pre_bias, c.sae.topk.auxk_coef = True, False, 0.0
    c.data.source, c.data.path = "npy", data_path
    c.data.normalize, c.data.eval_fraction = False, 0.0
    c.data.batch_size = 1024
    c.optim.lr, c.optim.warmup_steps = 1e-3, 50
    c.train.algorithm = algorithm
    if algorithm == "pam_sgd":
        p = c.train.pam_sgd
        p.block_tokens, p.encoder_steps = 8 * 1024, 8
        p.rho, p.cg_tol, p.cg_max_iters = 1e-4, 1e-4, 500
        p.max_codes = 128
    c.train.steps, c.train.log_every, c.train.eval_batches = steps, 10, 0
    c.train.progress = False
    c.eval.at_end = False
    c.checkpoint.every_steps, c.checkpoint.keep_every, c.checkpoint.keep_last = every, every, 1
    c.checkpoint.async_save = False
    c.mesh.model = 1
    c.lock()
    return c


def evaluate_checkpoints(config, workdir: str, held: np.ndarray, dense_threshold: float) -> list[dict]:
    """Held-out nmse, L0 and dense fraction of every kept checkpoint (and its wall-clock)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from saejax.algorithms import get_algorithm
    from saejax.models import get_family
    from saejax.sharding import make_mesh

    mesh = make_mesh(1, 1)
    family = get_family(config)
    algorithm = get_algorithm(family, config, mesh)
    encode = jax.jit(lambda p, x: family.encode(p, x, mesh))
    elapsed = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            elapsed[row["step"]] = row["elapsed_s"]
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
    points = []
    x = jnp.asarray(held)
    with ocp.CheckpointManager(directory, item_names=("state", "meta")) as manager:
        for step in steps:
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
            params = {k: jnp.asarray(v) for k, v in algorithm.inference_params(state).items()}
            codes = encode(params, x)
            recon = np.asarray(family.decode(params, codes, mesh))
            values = np.asarray(codes.values)
            nmse = float(np.sum((held - recon) ** 2) / np.sum((held - held.mean(0)) ** 2))
            l0 = float(np.mean(np.sum(values != 0, axis=1)))
            if hasattr(codes, "indices"):
                counts = np.bincount(np.asarray(codes.indices)[values != 0], minlength=family.n)
            else:
                counts = np.sum(values != 0, axis=0)
            points.append({"step": step, "tokens": step * config.data.batch_size, "elapsed_s": elapsed.get(step),
                           "nmse": nmse, "l0": l0,
                           "dense_fraction": float(np.mean(counts > dense_threshold * len(held)))})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="runs/minilm/acts")
    parser.add_argument("--workdir", default="runs/pam_minilm")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--plot", default="docs/pam_minilm.png")
    args = parser.parse_args()

    from saejax.trainer import train_and_evaluate

    args.workdir = os.path.abspath(args.workdir)  # orbax wants absolute checkpoint paths
    data = build_data(args.store, os.path.join(args.workdir, "data"))
    runs = [(v, f) for v in ("topk", "topk_ref") for f in FRACTIONS] + [("relu", f) for f in RELU_FRACTIONS]
    results_path = os.path.join(args.workdir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for variant, fraction in runs:
        kind = "zscored" if variant == "topk_ref" else "scaled"
        held = np.load(os.path.join(args.workdir, "data", f"eval_{kind}.npy"))
        for algorithm in ("adam", "pam_sgd"):
            name = f"{variant}-{fraction:g}-{algorithm}"
            if name in results:
                continue
            config = make_config(variant, algorithm, data["files"][f"{kind}_{fraction:g}"]["path"],
                                 args.steps, args.every)
            workdir = os.path.join(args.workdir, name)
            start = time.time()
            train_and_evaluate(config, workdir)
            points = evaluate_checkpoints(config, workdir, held, float(config.sae.dense_threshold))
            results[name] = {"variant": variant, "fraction": fraction, "algorithm": algorithm,
                             "rows": data["files"][f"{kind}_{fraction:g}"]["rows"],
                             "wall_s": time.time() - start, "points": points}
            print(f"{name}: held-out nmse {points[-1]['nmse']:.4f}, L0 {points[-1]['l0']:.1f}, "
                  f"dense {points[-1]['dense_fraction']:.3f} ({time.time() - start:.0f} s)", flush=True)
            with open(results_path, "w") as f:
                json.dump(results, f, indent=1)
    table(results)
    plot(results, args.plot)


def table(results: dict) -> None:
    print("| config | data | rows | Adam nmse | PAM-SGD nmse | Adam L0 | PAM L0 | Adam dense | PAM dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["variant"], r["fraction"]) for r in results.values()})
    for variant, fraction in keys:
        a = results.get(f"{variant}-{fraction:g}-adam")
        p = results.get(f"{variant}-{fraction:g}-pam_sgd")
        if not (a and p):
            continue
        la, lp = a["points"][-1], p["points"][-1]
        print(f"| {variant} | {fraction:.0%} | {a['rows']:,} | {la['nmse']:.4f} | {lp['nmse']:.4f} | "
              f"{la['l0']:.1f} | {lp['l0']:.1f} | {la['dense_fraction']:.3f} | {lp['dense_fraction']:.3f} |")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["variant"] for r in results.values()})
    fig, axes = plt.subplots(2, len(variants), figsize=(5 * len(variants), 8), squeeze=False)
    colors = {0.01: "tab:red", 0.1: "tab:orange", 1.0: "tab:blue"}
    for column, variant in enumerate(variants):
        for r in results.values():
            if r["variant"] != variant:
                continue
            style = "-" if r["algorithm"] == "pam_sgd" else "--"
            label = f"{'PAM-SGD' if r['algorithm'] == 'pam_sgd' else 'Adam'}, {r['fraction']:.0%} of store"
            pts = r["points"]
            axes[0, column].plot([q["tokens"] for q in pts], [q["nmse"] for q in pts], style,
                                 color=colors.get(r["fraction"]), label=label)
            axes[1, column].plot([q["elapsed_s"] for q in pts], [q["nmse"] for q in pts], style,
                                 color=colors.get(r["fraction"]), label=label)
        axes[0, column].set(title=variant, xlabel="training tokens seen", ylabel="held-out nmse", yscale="log")
        axes[1, column].set(xlabel="wall-clock (s, 2 shared CPU cores)", ylabel="held-out nmse", yscale="log")
        axes[0, column].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

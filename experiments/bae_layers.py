"""Feature-set entropy against layer (Cho et al. 2025's "inference dynamics"): one BAE per block.

For every block L of the embedded model (all-MiniLM-L6-v2, 6 blocks, d=384), harvest
`resid_post.L` from the built-in text (65,536 tokens each) into WORKDIR/acts_L, train a BAE of
n = 4d = 1536 latents on it (400 steps of 1024 tokens, Adam 1e-3, the entropy weight below), and
measure the feature-set entropy (saejax.entropy) of its held-out tokens (4096, and the mean over
batches of 1024), with the held-out nmse next to it so an entropy is read with the fit it came
with. Writes WORKDIR/bae_layers.json and the plot (default docs/bae_layers.png):

  PYTHONPATH=. python experiments/bae_layers.py --workdir runs/bae_layers

About 15 minutes on 2 loaded CPU cores (harvests reuse a store already there).
"""

from __future__ import annotations

import argparse
import json
import os

BLOCKS = range(6)
TOKENS = 65_536


def harvest_block(workdir: str, block: int) -> str:
    from saejax.config import load_config
    from saejax.harvest import harvest
    from saejax.harvest.config import BUILTIN_DIR, harvest_config

    store = os.path.join(workdir, f"acts_{block}")
    if not os.path.exists(os.path.join(store, "metadata.json")):
        overrides = [("hookpoint", f"resid_post.{block}"), ("max_tokens", str(TOKENS)), ("progress", "false")]
        harvest(load_config("minilm", overrides, schema=harvest_config, builtin_dir=BUILTIN_DIR), store)
    return store


def bae_config(store: str, entropy_weight: float, steps: int):
    from saejax.config import base_config, set_value

    config = base_config()
    set_value(config, "sae.family", "binary")
    values = {"sae.d": 384, "sae.n": 1536, "sae.binary.entropy_weight": entropy_weight,
              "sae.init_sample_rows": 16384, "sae.dead_tokens": 65_536,
              "data.source": "store", "data.path": store, "data.batch_size": 1024, "data.eval_fraction": 0.0625,
              "optim.lr": 1e-3, "optim.warmup_steps": 50, "train.steps": steps, "train.log_every": 100,
              "train.eval_batches": 4, "train.progress": False, "checkpoint.every_steps": 0, "mesh.model": 1,
              "eval.progress": False, "eval.reconstruction.tokens": 4096, "eval.reconstruction.plot": False,
              "eval.feature_entropy.tokens": 4096, "eval.feature_entropy.batch": 1024}
    for key in ("downstream", "probes", "ablation", "explain"):
        values[f"eval.{key}.enabled"] = False
    for key, value in values.items():
        set_value(config, key, value)
    config.lock()
    return config


def plot(rows, path: str, entropy_weight: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [r["block"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(blocks, [r["entropy_bits"] for r in rows], "o-", label="4096 held-out tokens")
    ax.plot(blocks, [r["batch_entropy_bits"] for r in rows], "s--", label="mean over batches of 1024")
    ax.set_xlabel("MiniLM block (resid_post.L)")
    ax.set_ylabel("feature-set entropy (bits)")
    ax.set_title(f"BAE n=1536 per block, w_e={entropy_weight:g}", fontsize=9)
    right = ax.twinx()
    right.plot(blocks, [r["nmse"] for r in rows], "x:", color="gray", label="held-out nmse")
    right.set_ylabel("nmse", color="gray")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--entropy-weight", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--plot", default="docs/bae_layers.png")
    args = parser.parse_args()

    from saejax.trainer import train_and_evaluate

    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for block in BLOCKS:
        store = harvest_block(args.workdir, block)
        run_dir = os.path.join(args.workdir, f"bae_{block}")
        results = train_and_evaluate(bae_config(store, args.entropy_weight, args.steps), run_dir)
        figures = json.load(open(os.path.join(run_dir, "eval.json")))["evaluators"]["feature_entropy"]
        held = results["eval_metrics"]
        rows.append({"block": block, "hookpoint": f"resid_post.{block}", "entropy_bits": figures["entropy_bits"],
                     "batch_entropy_bits": figures["batch_entropy_bits"], "tokens": figures["tokens"],
                     "nmse": held["nmse"], "l0": held["l0"], "dense_fraction": held["dense_fraction"],
                     "dead_fraction": held["dead_fraction"]})
        print(json.dumps(rows[-1]), flush=True)
    out = {"entropy_weight": args.entropy_weight, "steps": args.steps, "n": 1536, "rows": rows}
    json.dump(out, open(os.path.join(args.workdir, "bae_layers.json"), "w"), indent=1)
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    plot(rows, args.plot, args.entropy_weight)
    json.dump(out, open(os.path.splitext(args.plot)[0] + ".json", "w"), indent=1)


if __name__ == "__main__":
    main()

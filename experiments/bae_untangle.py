"""Feature untangling (Cho et al. 2025's second use of BAE): dense and dead latents, BAE vs SAEs.

The paper's claim: BAE avoids dense features (firing on > 10% of tokens) that SAEs with
per-token sparsity (TopK, ReLU+L1, JumpReLU) produce. Every family here trains on MiniLM's
residual stream after block 3 (the built-in store, d=384), n = 4d = 1536 (the paper's width),
600 steps of 1024 tokens with Adam at 1e-3 after a 50-step warm-up, and is measured on the same
5120 held-out tokens through its inference encode: nmse, L0, dense and dead fractions (the
trainer's held-out figures) and the feature-set entropy of those tokens. BAE is swept over its
entropy weight (0 = no entropy term; the units: w_e * n bits against an nmse of ~0.1).

  saejax harvest --store runs/minilm/acts --config.progress=false
  PYTHONPATH=. python experiments/bae_untangle.py --store runs/minilm/acts --workdir runs/untangle

writes WORKDIR/untangle.json and prints the README's table (about 20 minutes on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import json
import os

RUNS = [  # (name, overrides): comparable reconstruction is read off the table's nmse column
    ("bae w_e=0", {"sae.family": "binary", "sae.binary.entropy_weight": 0.0}),
    ("bae w_e=1e-5", {"sae.family": "binary", "sae.binary.entropy_weight": 1e-5}),
    ("bae w_e=1e-4", {"sae.family": "binary", "sae.binary.entropy_weight": 1e-4}),
    ("bae w_e=1e-3", {"sae.family": "binary", "sae.binary.entropy_weight": 1e-3}),
    ("topk k=32", {"sae.family": "topk", "sae.topk.k": 32}),
    ("topk k=128", {"sae.family": "topk", "sae.topk.k": 128}),
    ("relu l1=3", {"sae.family": "relu", "sae.relu.l1_coef": 3.0}),
    ("relu l1=0.5", {"sae.family": "relu", "sae.relu.l1_coef": 0.5}),
    ("jumprelu L0->32", {"sae.family": "jumprelu", "sae.jumprelu.target_l0": 32.0}),
    ("jumprelu L0->128", {"sae.family": "jumprelu", "sae.jumprelu.target_l0": 128.0}),
    ("bae sigmoid w_e=1e-4", {"sae.family": "binary", "sae.binary.entropy_weight": 1e-4,
                              "sae.binary.estimator": "sigmoid"}),
    ("bae sigmoid w_e=1e-3", {"sae.family": "binary", "sae.binary.entropy_weight": 1e-3,
                              "sae.binary.estimator": "sigmoid"}),
]


def run_config(store: str, overrides: dict):
    from saejax.config import base_config, set_value

    config = base_config()
    set_value(config, "sae.family", overrides["sae.family"])
    base = {"sae.d": 384, "sae.n": 1536, "sae.dead_tokens": 250_000, "sae.init_sample_rows": 16384,
            "data.source": "store", "data.path": store, "data.batch_size": 1024, "data.eval_fraction": 0.02,
            "optim.lr": 1e-3, "optim.warmup_steps": 50, "train.steps": 600, "train.log_every": 100,
            "train.eval_batches": 5, "train.progress": False, "checkpoint.every_steps": 0, "mesh.model": 1,
            "eval.progress": False, "eval.reconstruction.tokens": 5120, "eval.feature_entropy.tokens": 5120,
            "eval.feature_entropy.batch": 1024}
    for key in ("downstream", "probes", "ablation", "explain"):  # the model metrics: not this study's
        base[f"eval.{key}.enabled"] = False
    for key, value in {**base, **overrides}.items():
        if key != "sae.family":
            set_value(config, key, value)
    config.lock()
    return config


def row(name, results, report):
    held = results["eval_metrics"]
    return {"run": name, "family": results["family"], "nmse": held["nmse"], "l0": held["l0"],
            "dense_fraction": held["dense_fraction"], "dead_fraction": held["dead_fraction"],
            "entropy_bits": report["evaluators"]["feature_entropy"]["entropy_bits"],
            "batch_entropy_bits": report["evaluators"]["feature_entropy"]["batch_entropy_bits"],
            "always_on_fraction": report.get("always_on_fraction")}


def always_on_fraction(run_dir: str, store: str, config) -> float:
    """Fraction of latents firing on > 90% of the held-out tokens (dense the other way round)."""
    import numpy as np

    from saejax.evaluation.inputs import EvalInputs
    from saejax.evaluation.reconstruction import fire_counts

    inputs = EvalInputs(run_dir, config, False)
    counts, tokens = np.zeros(inputs.sae.n, np.int64), 0
    for raw in inputs.heldout_rows(5120):
        codes = inputs.sae.encode(np.asarray(raw, np.float32) * np.float32(inputs.sae.scale), normalized=True)
        counts += fire_counts(codes, inputs.sae.n, float(config.sae.fire_threshold))
        tokens += raw.shape[0]
    return float(np.mean(counts > 0.9 * tokens))


def table(rows) -> str:
    lines = ["| run | nmse | L0 | dense (>10%) | always on (>90%) | dead | entropy (bits) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['nmse']:.3f} | {r['l0']:.1f} | {100 * r['dense_fraction']:.1f}% | "
                     f"{100 * r['always_on_fraction']:.1f}% | {100 * r['dead_fraction']:.1f}% | "
                     f"{r['entropy_bits']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", default=None, help="comma-separated run names")
    args = parser.parse_args()

    from saejax.trainer import train_and_evaluate

    os.makedirs(args.workdir, exist_ok=True)
    out = os.path.join(args.workdir, "untangle.json")
    rows = json.load(open(out)) if os.path.exists(out) else []
    done = {r["run"] for r in rows}
    wanted = set(args.only.split(",")) if args.only else None
    for name, overrides in RUNS:
        if name in done or (wanted and name not in wanted):
            continue
        config = run_config(args.store, overrides)
        run_dir = os.path.join(args.workdir, name.replace(" ", "_").replace(">", ""))
        results = train_and_evaluate(config, run_dir)
        report = json.load(open(os.path.join(run_dir, "eval.json")))
        report["always_on_fraction"] = always_on_fraction(run_dir, args.store, config)
        rows.append(row(name, results, report))
        print(json.dumps(rows[-1]), flush=True)
        json.dump(rows, open(out, "w"), indent=1)
    order = [name for name, _ in RUNS]
    rows.sort(key=lambda r: order.index(r["run"]) if r["run"] in order else len(order))
    print(table(rows))


if __name__ == "__main__":
    main()

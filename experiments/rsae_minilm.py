"""Rational SAE upgrades of TopK, ReLU+L1 and JumpReLU teachers on MiniLM (Yin & Yu's claim, tested).

Teachers: n = 1024 SAEs on the embedded MiniLM store (all-MiniLM-L6-v2 after block 3, d = 384),
800 steps of 1024 tokens, Adam 1e-3 (experiments/families_minilm.py's recipe):

  topk k = 16,  relu l1_coef = 5.0,  jumprelu target_l0 = 16

and one imported teacher: the TopK one exported to SAELens format and imported back
(`saejax export` / `saejax import`). Each is upgraded with `saejax upgrade` (stage 1, then
FINETUNE steps under the teacher's objective), and, as the control the comparison needs, the
teacher itself is trained FINETUNE more steps from its last checkpoint (same data, same steps,
same optimiser settings): a gain of the RSAE over the teacher that the continued teacher also
shows is extra training, not the rational gate.

All figures are on the same held-out rows (the store's eval split, 5 batches of 1024 tokens).
MiniLM is a sentence encoder with no LM head, so there is no loss recovered; `saejax eval` reports
reconstruction only (see eval.json: the downstream metrics are skipped).

  PYTHONPATH=. python experiments/rsae_minilm.py --store runs/minilm/acts --workdir runs/rsae

About 15 minutes on 2 busy CPU cores; prints the README's table (markdown) and writes
WORKDIR/table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

FINETUNE = int(os.environ.get("RSAE_FINETUNE", "300"))  # a smoke run sets it small
TEACHERS = {
    "topk": {"sae.family": "topk", "sae.topk.k": 16},
    "relu": {"sae.family": "relu", "sae.relu.l1_coef": 5.0},
    "jumprelu": {"sae.family": "jumprelu", "sae.jumprelu.target_l0": 16.0},
}
UPGRADE = {"topk": [("sae.rational.threshold", "0.0")], "relu": [], "jumprelu": []}
EVAL_OFF = ("downstream", "probes", "ablation", "explain")


def teacher_config(store: str, steps: int, overrides: dict):
    from saejax.config import base_config, set_value

    config = base_config()
    for key, value in [("sae.d", 384), ("sae.n", 1024), ("sae.dead_tokens", 250_000),
                       ("sae.init_sample_rows", 16384), ("data.source", "store"), ("data.path", store),
                       ("data.batch_size", 1024), ("data.eval_fraction", 0.02), ("optim.lr", 1e-3),
                       ("optim.warmup_steps", 50), ("train.steps", steps), ("train.log_every", 100),
                       ("train.eval_batches", 5), ("train.progress", False), ("checkpoint.every_steps", 400),
                       ("checkpoint.keep_last", 1), ("mesh.model", 1), ("eval.at_end", False)]:
        set_value(config, key, value)
    for key, value in overrides.items():
        set_value(config, key, value)
    config.lock()
    return config


def heldout(run_dir: str, config):
    """Held-out reconstruction figures of a run, through the same helper the upgrade uses."""
    from saejax.export import load_sae
    from saejax.upgrade import _heldout

    sae = load_sae(run_dir)
    return _heldout(config, sae.family, sae.params, float(sae.cfg["normalization"]["scale"]))


def main() -> None:
    from saejax.interop import export_run, import_sae
    from saejax.trainer import train_and_evaluate
    from saejax.upgrade import upgrade

    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--teacher-steps", type=int, default=800)
    args = parser.parse_args()
    root, store = os.path.abspath(args.workdir), os.path.abspath(args.store)
    os.makedirs(root, exist_ok=True)
    eval_off = [(f"eval.{name}.enabled", "false") for name in EVAL_OFF] + [("eval.at_end", "true")]
    table = {}
    for name, overrides in TEACHERS.items():
        teacher_dir = os.path.join(root, f"{name}_teacher")
        config = teacher_config(store, args.teacher_steps, overrides)
        train_and_evaluate(config, teacher_dir)
        # The control: the same teacher, FINETUNE more steps (resumed from its checkpoint).
        longer = os.path.join(root, f"{name}_teacher_longer")
        if not os.path.exists(longer):
            shutil.copytree(teacher_dir, longer)
            for leftover in ("results.json", "cfg.json", "sae.safetensors", ".lock"):
                if os.path.exists(os.path.join(longer, leftover)):
                    os.remove(os.path.join(longer, leftover))
        train_and_evaluate(teacher_config(store, args.teacher_steps + FINETUNE, overrides), longer)
        rsae = os.path.join(root, f"{name}_rsae")
        report = upgrade(teacher_dir, rsae, [("train.steps", str(FINETUNE))] + UPGRADE[name] + eval_off)
        rows = dict(report["heldout_rows"])
        rows["teacher_longer"] = heldout(longer, config)
        table[name] = {"rows": rows, "scalars": report["stage1_scalars"], "eval": report.get("student", {})}
    # An imported teacher: the TopK run through SAELens format and back.
    saelens = os.path.join(root, "topk_saelens")
    imported = os.path.join(root, "topk_imported")
    if not os.path.exists(imported):
        export_run(os.path.join(root, "topk_teacher"), "saelens", saelens)
        import_sae(saelens, "saelens", imported)
    report = upgrade(imported, os.path.join(root, "imported_rsae"),
                     [("train.steps", str(FINETUNE)), ("sae.rational.threshold", "0.0"),
                      ("sae.d", "384"), ("sae.n", "1024"), ("data.batch_size", "1024"), ("optim.lr", "1e-3"),
                      ("optim.warmup_steps", "50"), ("train.eval_batches", "5"), ("data.eval_fraction", "0.02"),
                      ("sae.init_sample_rows", "16384"), ("train.progress", "false"), ("mesh.model", "1")]
                     + eval_off, store=store)
    table["topk (imported, SAELens)"] = {"rows": report["heldout_rows"], "scalars": report["stage1_scalars"]}
    with open(os.path.join(root, "table.json"), "w") as f:
        json.dump(table, f, indent=2)
    print("| teacher | model | nmse | L0 | dead | dense |")
    print("|---|---|---|---|---|---|")
    for name, entry in table.items():
        for row in ("teacher", "stage1", "student", "teacher_longer"):
            if row in entry["rows"]:
                m = entry["rows"][row]
                label = {"teacher": "teacher", "stage1": "RSAE stage 1", "student": f"RSAE +{FINETUNE} steps",
                         "teacher_longer": f"teacher +{FINETUNE} steps"}[row]
                print(f"| {name} | {label} | {m['nmse']:.4f} | {m['l0']:.2f} | {m['dead_fraction']:.3f} | "
                      f"{m['dense_fraction']:.3f} |")


if __name__ == "__main__":
    main()

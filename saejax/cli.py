"""`saejax` command line: harvest, train, eval, plan, store, sweep, fit, frontier.

  saejax harvest --config CONFIG[:VARIANT] [--config.KEY=VALUE ...] --store DIR
  saejax train   --config CONFIG[:VARIANT] [--config.KEY=VALUE ...] --workdir DIR
  saejax plan    --config CONFIG[:VARIANT] [--config.KEY=VALUE ...] [--devices N]
  saejax store   DIR
  saejax eval    RUN_DIR [--store STORE] [--config.eval.KEY=VALUE ...]
  saejax sweep   STUDY.py --workdir DIR [--parallel N] [--one-pass] [--point I] [--list]
  saejax fit     SWEEP_DIR [--metric nmse] [--bootstrap 1000] [--family NAME] [--out DIR]
  saejax frontier SWEEP_DIR [--metric nmse] [--out DIR]
  saejax export  RUN_DIR --format saelens|sparsify|openai|dictionary_learning --out DIR
  saejax import  SRC --format saelens|sparsify|openai|dictionary_learning --out RUN_DIR
  saejax upgrade --from RUN_DIR --workdir DIR [--store STORE] [--config.KEY=VALUE ...]

CONFIG is a path to a Python file with get_config(), or the name of a
built-in config: for train and plan default, minilm, npy, gpt2_small,
plan_16m; for harvest minilm (the default) and gpt2. Exit codes: 0 done,
2 bad input, 3 training diverged (NaN/inf), 4 over the memory budget,
5 a write failed (full disk), 6 the workdir is in use, 7 a peer process
died, 75 preempted after saving (requeue the job).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from saejax.errors import SaeJaxError

DEFAULT_CONFIG = "default"
DEFAULT_HARVEST_CONFIG = "minilm"


def _split_overrides(extra: Sequence[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """--config.a.b=v and --config.a.b v into [("a.b", "v")]; anything else is an error."""
    overrides, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            parser.error(f"unrecognised argument {arg!r}")
        key, eq, value = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                parser.error(f"{arg} needs a value: {arg}=VALUE")
            value = extra[i + 1]
            i += 1
        overrides.append((key, value))
        i += 1
    return overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saejax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "config file (or built-in name) with an optional :variant, e.g. default:n=2048,k=16"

    train = commands.add_parser("train", help="train an SAE (resumes from the workdir's checkpoints)")
    train.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, results.json, sae.safetensors")

    harvest = commands.add_parser("harvest", help="store a model's activations at a hookpoint (continues an interrupted harvest)")
    harvest.add_argument("--config", default=DEFAULT_HARVEST_CONFIG, help=config_help.replace("default:n=2048,k=16", "minilm:hookpoint=resid_post.5"))
    harvest.add_argument("--store", required=True, help="store directory: zarr3 arrays, metadata.json, ledger.json")

    evaluate = commands.add_parser(
        "eval", help="evaluate a trained SAE: reconstruction, downstream LM loss, probes, ablation, explanations")
    evaluate.add_argument("run_dir", help="run directory (what `saejax train --workdir` or `saejax import` wrote)")
    evaluate.add_argument("--store", default="",
                          help="activation store to evaluate on (needed for an imported SAE; default: the run's)")

    store = commands.add_parser("store", help="describe an activation store (its ledger)")
    store.add_argument("path", help="store directory")

    plan = commands.add_parser("plan", help="compile the train step and print its per-device memory and FLOPs")
    plan.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)
    plan.add_argument("--devices", type=int, default=0,
                      help="plan for N simulated CPU devices (a topology you don't have); default: the real devices")
    plan.add_argument("--json", default="", help="also write the plan to this file as JSON")
    from saejax.scaling.command import add_arguments as add_fit_arguments
    from saejax.sweep.command import add_arguments as add_sweep_arguments

    add_sweep_arguments(commands.add_parser("sweep", help="run every point of a study's n x k grid (idempotent)"))
    add_fit_arguments(commands.add_parser("fit", help="fit scaling laws to a sweep's results; print a table, write plots"))
    from saejax.scaling.frontier import add_arguments as add_frontier_arguments

    add_frontier_arguments(commands.add_parser(
        "frontier", help="every family of a sweep on one nmse-L0 frontier: a plot and a table"))
    from saejax.interop import FORMATS

    formats = "|".join(FORMATS)
    export = commands.add_parser("export", help="write a run's SAE in another library's format")
    export.add_argument("run_dir", help="saejax run directory (sae.safetensors + cfg.json)")
    export.add_argument("--format", required=True, choices=list(FORMATS), metavar=formats)
    export.add_argument("--out", required=True, help="new directory to write (nothing is overwritten)")
    imp = commands.add_parser("import", help="convert another library's SAE into a saejax run directory")
    imp.add_argument("src", help="the other library's SAE (file or directory)")
    imp.add_argument("--format", required=True, choices=list(FORMATS), metavar=formats)
    imp.add_argument("--out", required=True, help="new run directory: sae.safetensors + cfg.json")
    upgrade = commands.add_parser("upgrade", help="fine-tune a trained or imported SAE into a Rational SAE")
    upgrade.add_argument("--from", dest="from_dir", required=True,
                         help="the teacher: a saejax run directory, or one written by `saejax import`")
    upgrade.add_argument("--workdir", required=True, help="new run directory of the Rational SAE")
    upgrade.add_argument("--store", default="", help="activation store to fine-tune on (needed for an imported SAE)")
    return parser


def _upgrade(args, overrides) -> int:
    from saejax.upgrade import upgrade

    report = upgrade(args.from_dir, args.workdir, overrides, store=args.store,
                     log=lambda m: print(m, file=sys.stderr))
    rows = report["heldout_rows"]
    print(f"upgraded {report['teacher_family']} -> rational {tuple(report['degrees'])}: {args.workdir}")
    for name in ("teacher", "stage1", "student"):
        m = rows[name]
        print(f"  {name:<8} nmse {m['nmse']:.5f}  L0 {m['l0']:.2f}  dead {m['dead_fraction']:.4f}  "
              f"dense {m['dense_fraction']:.4f}")
    print(f"  eval:    {os.path.join(args.workdir, 'eval.json')}")
    return 0


def _interop(args) -> int:
    import os

    from saejax.interop import export_run, import_sae

    if args.command == "export":
        out = export_run(args.run_dir, args.format, args.out)
    else:
        out = import_sae(args.src, args.format, args.out)
    print(f"{args.command}ed ({args.format}): {out}")
    for root, _, files in sorted(os.walk(out)):
        for name in sorted(files):
            print(f"  {os.path.relpath(os.path.join(root, name), out)}")
    return 0


def _simulate_cpu_devices(count: int) -> None:
    """Must run before JAX touches a backend."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def _train(args, config) -> int:
    from saejax.trainer import train_and_evaluate

    import jax

    results = train_and_evaluate(config, args.workdir)
    if jax.process_index() != 0:  # multi-host: one summary per job
        return 0
    metrics = results.get("eval_metrics") or results.get("final_train_metrics", {})
    summary = [f"done: {results['steps']} steps, {results['tokens_seen']:,} tokens in {results['wall_time_s']:.1f}s"]
    summary.append("  nmse {:.4f}  L0 {:.2f}  dead fraction {:.4f}".format(
        metrics.get("nmse", float("nan")), metrics.get("l0", float("nan")),
        results.get("final_train_metrics", {}).get("dead_fraction", float("nan"))))
    if "feature_recovery_mmcs" in results:
        summary.append(f"  feature recovery (mean max cosine to the true dictionary) {results['feature_recovery_mmcs']:.4f}")
    evaluated = results.get("eval") or {}
    if evaluated:
        figures = [f"{label} {metrics[key]:.4g}" for key, label in (
            ("loss_recovered", "loss recovered"), ("ce_delta", "CE +"), ("kl_spliced", "KL"),
            ("probe_loss", "probe loss"), ("ablation_sparsity", "ablation sparsity"),
            ("explain_f1", "n-gram F1")) if isinstance(metrics.get(key), float)]
        if figures:
            summary.append("  eval: " + "  ".join(figures))
        for name, reason in evaluated.get("skipped", {}).items():
            summary.append(f"  eval: {name} skipped: {reason}")
        summary.append(f"  eval:    {evaluated['file']}")
    summary.append(f"  results: {os.path.join(args.workdir, 'results.json')}")
    summary.append(f"  SAE:     {results['files']['sae']} (+ cfg.json)")
    print("\n".join(summary))
    return 0


def _plan(args, config) -> int:
    import jax

    from saejax.algorithms import get_algorithm
    from saejax.config import validate
    from saejax.models import get_family
    from saejax.plan import check_budget, compile_train_step, format_plan, make_plan
    from saejax.sharding import make_mesh

    mesh = make_mesh(*validate(config, jax.device_count()))
    family = get_family(config)
    algorithm = get_algorithm(family, config, mesh)
    abstract_state = algorithm.abstract_state(int(config.sae.init_sample_rows))
    compiled = compile_train_step(algorithm, abstract_state, int(config.data.batch_size), mesh)
    plan = make_plan(compiled, abstract_state, family, config, mesh)
    print(format_plan(plan, config))
    if args.json:
        from saejax.export import write_json_atomic

        write_json_atomic(args.json, {**plan.as_dict(), "peak_bytes": plan.peak_bytes})
    check_budget(plan, config)
    if plan.largest_all_gather >= plan.batch_by_latents:
        print("warning: the step all-gathers an array as large as a batch x latents block", file=sys.stderr)
    return 0


def _harvest(args, config) -> int:
    from saejax.harvest import harvest

    ledger = harvest(config, args.store)
    print(_describe_store(args.store, ledger))
    return 0


def _describe_store(path: str, ledger: dict) -> str:
    model, geometry = ledger["model"], ledger["geometry"]
    return "\n".join([
        f"store {path}: complete",
        f"  {ledger['num_tokens']:,} tokens x d={ledger['d']} ({ledger['dtype']}) from {ledger['contexts']:,} contexts "
        f"of {ledger['context_length']} tokens",
        f"  model {model['name']} ({model['class']}), hookpoint {ledger['hookpoint']}: {ledger['hookpoint_convention']}",
        f"  text {ledger['text']['source']}; special tokens excluded: {ledger['excluded_tokens']['special_tokens_excluded']}",
        f"  normalisation scale {ledger['normalization']['scale']:.6g} (E||x||^2 = d after scaling)",
        f"  chunks of {geometry['chunk_rows']} rows, shards of {geometry['shard_rows']} rows",
        f"  train on it: saejax train --config CONFIG --config.data.source=store --config.data.path={path} "
        f"--config.sae.d={ledger['d']} --workdir DIR",
    ])


def _eval(args, overrides) -> int:
    from saejax.evaluation.run import evaluate_run, format_report

    report = evaluate_run(args.run_dir, overrides=overrides, log=lambda m: print(m, file=sys.stderr),
                          store=args.store)
    print(format_report(report))
    return 0


def _store(args) -> int:
    from saejax.store.layout import read_ledger

    print(_describe_store(args.path, read_ledger(args.path)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = _split_overrides(extra, parser)
    try:
        if args.command in ("export", "import"):
            if overrides:
                parser.error(f"saejax {args.command} takes no --config overrides")
            return _interop(args)
        if args.command in ("store", "fit", "frontier"):
            if overrides:
                parser.error(f"saejax {args.command} takes no --config overrides")
            if args.command == "fit":
                from saejax.scaling.command import main as fit_main

                return fit_main(args)
            if args.command == "frontier":
                from saejax.scaling.frontier import main as frontier_main

                return frontier_main(args)
            return _store(args)
        if args.command == "train":
            # Multi-host jobs (SLURM, TPU VM, explicit coordinator): join before JAX picks a backend.
            # (`sweep --point` does the same in saejax.sweep.command.)
            from saejax.distributed import initialize_from_env

            initialize_from_env()
        if args.command == "eval":
            return _eval(args, overrides)
        if args.command == "upgrade":
            return _upgrade(args, overrides)
        if args.command == "sweep":
            from saejax.sweep.command import main as sweep_main

            return sweep_main(args, overrides)
        if args.command == "plan" and args.devices:
            _simulate_cpu_devices(args.devices)
        from saejax.config import load_config

        if args.command == "harvest":
            from saejax.harvest.config import BUILTIN_DIR, harvest_config

            config = load_config(args.config, overrides, schema=harvest_config, builtin_dir=BUILTIN_DIR)
            return _harvest(args, config)
        config = load_config(args.config, overrides)
        return {"train": _train, "plan": _plan}[args.command](args, config)
    except SaeJaxError as e:
        print(f"saejax {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"saejax {args.command}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()


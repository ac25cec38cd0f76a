"""`saejax sweep STUDY.py --workdir DIR`: run a study's grid, or one point of it, or list it.

  saejax sweep experiments/minilm_cpu.py --workdir runs/minilm_sweep            # every point, one after another
  saejax sweep experiments/minilm_cpu.py --workdir runs/minilm_sweep --parallel 2
  saejax sweep experiments/minilm_cpu.py --workdir runs/minilm_sweep --one-pass # runs sharing data: one pass
  saejax sweep experiments/gpt2_small.py --workdir $SCRATCH/gpt2 --list         # INDEX, NAME, POINT per line
  saejax sweep experiments/gpt2_small.py --workdir $SCRATCH/gpt2 --point 3      # one point here (SLURM array task)

Rerunning the same command skips finished runs, resumes interrupted ones
from their checkpoints and retries failed ones. WORKDIR/results.jsonl and
results.csv hold one row per finished or failed run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from saejax.errors import ConfigError, SaeJaxError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("study", help="study file: get_config() and get_hyper(hyper), e.g. experiments/minilm_cpu.py")
    parser.add_argument("--workdir", required=True, help="sweep directory: runs/<name>/, logs/, results.jsonl, results.csv")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="jobs at a time (default 1)")
    parser.add_argument("--one-pass", action="store_true",
                        help="train the runs that read the same batches (same seed, data and mesh) in one process, "
                             "reading the data once")
    parser.add_argument("--group-size", type=int, default=0, metavar="G",
                        help="with --one-pass: at most G runs per job (default: all that share data)")
    parser.add_argument("--gpus-per-run", type=int, default=0, metavar="G",
                        help="give each parallel job its own G GPUs through CUDA_VISIBLE_DEVICES")
    parser.add_argument("--point", default=None, metavar="I",
                        help="run only grid point I (index or run name) in this process; every process of a "
                             "multi-host job runs the same command (the distributed setup comes from the environment)")
    parser.add_argument("--list", action="store_true", help="print INDEX<TAB>NAME<TAB>POINT per grid point and exit")
    parser.add_argument("--fit", action="store_true", help="when every run has finished, run `saejax fit WORKDIR`")


def _select(specs, point: str):
    if point.isdigit():
        index = int(point)
        if index >= len(specs):
            raise ConfigError(f"--point {index} is out of range: the grid has {len(specs)} points (0..{len(specs) - 1})")
        return specs[index]
    for spec in specs:
        if spec.name == point:
            return spec
    raise ConfigError(f"--point {point!r} is neither an index nor a run name; `--list` shows both")


def _run_point(study, spec, grid, workdir: str) -> int:
    """One run in this process (SLURM array task, TPU VM worker); its exit code is the run's."""
    import jax

    from saejax.distributed import initialize_from_env
    from saejax.sweep.runner import ensure_store, write_run_config
    from saejax.sweep.table import finished, write_table
    from saejax.sweep.worker import run_locks, train_runs

    initialize_from_env()
    primary = jax.process_index() == 0
    if jax.process_count() == 1:
        ensure_store(study, [spec], print)
    if primary:
        write_run_config(spec)
    if finished(spec) is not None:
        print(f"{spec.name} has finished already; nothing to do")
        return 0
    single = jax.process_count() == 1
    if single:
        with run_locks([spec.run_dir]):
            code = train_runs([spec.run_dir], [spec.config])
    else:
        code = train_runs([spec.run_dir], [spec.config], write_failures=primary)
    if primary:
        write_table(grid, workdir)
    return code


def _fit(workdir: str) -> int:
    from saejax.scaling.command import add_arguments as add_fit_arguments
    from saejax.scaling.command import main as fit_main

    parser = argparse.ArgumentParser(prog="saejax fit")
    add_fit_arguments(parser)
    return fit_main(parser.parse_args([workdir]))


def main(args, overrides) -> int:
    from saejax.sweep.study import load_study, specs

    workdir = os.path.abspath(args.workdir)
    study = load_study(args.study)
    grid = specs(study, workdir, overrides)
    if args.list:
        for spec in grid:
            print(f"{spec.index}\t{spec.name}\t{json.dumps(spec.point, sort_keys=True)}")
        return 0
    if args.point is not None:
        return _run_point(study, _select(grid, args.point), grid, workdir)

    from saejax.sweep.runner import Runner, check_configs, ensure_store

    check_configs(grid)
    if args.group_size and not args.one_pass:
        raise ConfigError("--group-size only applies with --one-pass")
    runner = Runner(grid, workdir, args.parallel, args.one_pass, args.group_size, args.gpus_per_run)
    ensure_store(study, grid, print)
    code = runner.run()
    if code == 0 and args.fit:
        try:
            return _fit(workdir)
        except SaeJaxError as e:
            print(f"saejax fit: error: {e}", file=sys.stderr)
            return e.exit_code
    return code

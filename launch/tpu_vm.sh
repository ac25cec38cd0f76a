#!/usr/bin/env bash
# Run saejax on every worker of a Cloud TPU VM (single host or pod slice) at once.
#
#   launch/tpu_vm.sh [--dry-run] STUDY.py WORKDIR POINT [--config.KEY=VALUE ...]   # grid point POINT (0-based)
#   launch/tpu_vm.sh [--dry-run] STUDY.py WORKDIR all [--config.KEY=VALUE ...]     # the whole sweep, point after point
#   launch/tpu_vm.sh [--dry-run] train WORKDIR [CONFIG[:VARIANT]] [--config.KEY=VALUE ...]
#
#   TPU_NAME=sae-v4-32 ZONE=us-central2-b launch/tpu_vm.sh experiments/gpt2_small.py /mnt/shared/nk 3
#   TPU_NAME=sae-v4-32 ZONE=us-central2-b launch/tpu_vm.sh experiments/gpt2_small.py /mnt/shared/nk all
#   TPU_NAME=sae-v4-8 ZONE=us-central2-b PROJECT=my-proj launch/tpu_vm.sh train /mnt/shared/gpt2 gpt2_small
#   TPU_NAME=x ZONE=y launch/tpu_vm.sh --dry-run experiments/gpt2_small.py /mnt/shared/nk all   # print the gcloud command
#
# Every worker runs the same command through
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE [--project PROJECT] --worker=all --command ...
# with SAEJAX_DISTRIBUTED=jax, so the workers join one job with jax.distributed (JAX finds
# the workers from the TPU VM's metadata). STUDY.py and WORKDIR are paths on the workers:
# the study file must exist at that path on each of them, and WORKDIR must be a filesystem
# they all share (Filestore/NFS, or a gcsfuse mount), because checkpoints and the exported
# SAE are written by every worker.
#
# A whole sweep ("all") runs the grid points one after another, each on the whole slice:
# the workers list the grid (`saejax sweep --list`) and run `--point 0`, `--point 1`, ...
# and stop at the first point that does not finish. Finished points are skipped, so after
# a preemption (a point exits 75 after saving) or any fix, run the same command again and
# it continues where it stopped.
#
# Settings (environment variables):
#   TPU_NAME   required: the TPU VM's name
#   ZONE       required: its zone
#   PROJECT    optional: the Google Cloud project (default: gcloud's configured project)
#   SAEJAX     the saejax executable on the workers (default saejax), e.g. ~/venv/bin/saejax
set -euo pipefail

usage="usage: TPU_NAME=... ZONE=... launch/tpu_vm.sh [--dry-run] STUDY.py WORKDIR POINT|all [--config.KEY=VALUE ...]
       TPU_NAME=... ZONE=... launch/tpu_vm.sh [--dry-run] train WORKDIR [CONFIG[:VARIANT]] [--config.KEY=VALUE ...]"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
[[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }
saejax_bin="${SAEJAX:-saejax}"
env_prefix="export SAEJAX_DISTRIBUTED=jax PYTHONUNBUFFERED=1;"

if [[ "$1" == "train" ]]; then
  workdir="$2"
  shift 2
  config="default"
  if [[ $# -gt 0 && "$1" != --* ]]; then config="$1"; shift; fi
  remote="$env_prefix $(printf '%q ' "$saejax_bin" train --config "$config" --workdir "$workdir" "$@")"
  remote="${remote% }"
else
  [[ $# -ge 3 ]] || { echo "$usage" >&2; echo "launch/tpu_vm.sh: STUDY.py, WORKDIR and POINT (a grid index, or all) are required" >&2; exit 2; }
  study="$1" workdir="$2" point="$3"
  shift 3
  sweep="$(printf '%q ' "$saejax_bin" sweep "$study" --workdir "$workdir")"
  extra=""
  if [[ $# -gt 0 ]]; then extra="$(printf ' %q' "$@")"; fi
  if [[ "$point" == "all" ]]; then
    # Runs on the workers: list the grid, then each point in turn; set -e stops at the first failure.
    remote="set -eo pipefail; $env_prefix n=\$(${sweep}--list${extra} | wc -l);"
    remote+=" for i in \$(seq 0 \$((n - 1))); do ${sweep}--point \"\$i\"${extra}; done"
  elif [[ "$point" =~ ^[0-9]+$ ]]; then
    remote="$env_prefix ${sweep}--point ${point}${extra}"
  else
    echo "launch/tpu_vm.sh: POINT must be a grid index (0, 1, ...) or all, got '$point'" >&2
    exit 2
  fi
fi

: "${TPU_NAME:?set TPU_NAME=... (the Cloud TPU VM to run on)}"
: "${ZONE:?set ZONE=... (the zone of the TPU VM, e.g. us-central2-b)}"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then cmd+=(--project "$PROJECT"); fi
cmd+=(--worker=all --command "$remote")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
command -v gcloud >/dev/null || { echo "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)" >&2; exit 2; }
exec "${cmd[@]}"

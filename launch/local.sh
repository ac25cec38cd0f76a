#!/usr/bin/env bash
# Run saejax on this machine: one training run, or a whole sweep. Resumes from WORKDIR.
#
#   launch/local.sh [--dry-run] WORKDIR [CONFIG[:VARIANT]] [--config.KEY=VALUE ...]
#   launch/local.sh [--dry-run] sweep STUDY.py WORKDIR [--parallel N] [--one-pass] [--config.KEY=VALUE ...]
#
#   launch/local.sh runs/demo                                # the embedded default
#   launch/local.sh runs/n32k npy:path=acts.npy,n=32768      # your activations
#   SAEJAX_CPU_DEVICES=8 launch/local.sh runs/sharded        # split latents over 8 simulated CPU devices
#   SAEJAX_RETRIES=5 launch/local.sh runs/spot ...           # rerun after a preemption (exit 75), e.g. on spot VMs
#   launch/local.sh sweep experiments/gpt2_small.py runs/nk --parallel 2 # every grid point, two at a time
#   launch/local.sh --dry-run sweep experiments/gpt2_small.py runs/nk    # print the command, run nothing
#
# (A training workdir literally named "sweep" is written ./sweep.) Output goes to the
# terminal and to WORKDIR/train.log (WORKDIR/sweep.log for a sweep). A sweep run again
# skips the points it finished, so SAEJAX_RETRIES works for both. Exit code: saejax's
# (0 done, 2 bad input, 3 diverged, 4 over budget, 75 preempted and saved).
set -euo pipefail

usage="usage: launch/local.sh [--dry-run] WORKDIR [CONFIG[:VARIANT]] [--config.KEY=VALUE ...]
       launch/local.sh [--dry-run] sweep STUDY.py WORKDIR [--parallel N] [--one-pass] [--config.KEY=VALUE ...]"

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi

saejax_bin="${SAEJAX:-saejax}"
if [[ "${1:-}" == "sweep" ]]; then
  shift
  [[ $# -ge 2 ]] || { echo "$usage" >&2; echo "launch/local.sh sweep: STUDY.py and WORKDIR are required" >&2; exit 2; }
  study="$1" workdir="$2"
  shift 2
  saejax_args=(sweep "$study" --workdir "$workdir" "$@")
  log_name="sweep.log"
else
  workdir="${1:?$usage}"
  shift
  config="default"
  if [[ $# -gt 0 && "$1" != --* ]]; then config="$1"; shift; fi
  saejax_args=(train --config "$config" --workdir "$workdir" "$@")
  log_name="train.log"
fi
retries="${SAEJAX_RETRIES:-0}"
[[ "$retries" =~ ^[0-9]+$ ]] || { echo "SAEJAX_RETRIES must be a non-negative integer, got '$retries'" >&2; exit 2; }

env_prefix=(env PYTHONUNBUFFERED=1)
if [[ -n "${SAEJAX_CPU_DEVICES:-}" ]]; then
  [[ "$SAEJAX_CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] || { echo "SAEJAX_CPU_DEVICES must be a positive integer" >&2; exit 2; }
  env_prefix+=(JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$SAEJAX_CPU_DEVICES")
fi
cmd=("${env_prefix[@]}" "$saejax_bin" "${saejax_args[@]}")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

command -v "$saejax_bin" >/dev/null || { echo "'$saejax_bin' not found: install saejax (pip install -e .) or set SAEJAX=/path/to/saejax" >&2; exit 2; }
mkdir -p "$workdir"
log="$workdir/$log_name"
stopped=0
trap 'stopped=1' INT
attempt=0
while true; do
  set +e
  "${cmd[@]}" 2>&1 | tee -a "$log"
  code=${PIPESTATUS[0]}
  set -e
  if [[ $code -eq 75 && $stopped -eq 0 && $attempt -lt $retries ]]; then
    attempt=$((attempt + 1))
    echo "preempted; state saved; restarting ($attempt/$retries)" | tee -a "$log"
    continue
  fi
  exit "$code"
done

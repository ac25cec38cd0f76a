#!/usr/bin/env bash
# Submit a sweep to SLURM as an array job: one grid point per array task.
#
#   launch/slurm.sh [--dry-run] STUDY.py WORKDIR [--config.KEY=VALUE ...]
#
#   PARTITION=gpu launch/slurm.sh experiments/gpt2_small.py /shared/runs/nk
#   PARTITION=gpu NODES=2 GPUS_PER_NODE=8 TIME=12:00:00 MAX_PARALLEL=4 launch/slurm.sh experiments/gpt2_small.py /shared/runs/nk
#   PARTITION=cpu GPUS_PER_NODE=0 launch/slurm.sh --dry-run experiments/gpt2_small.py /shared/runs/nk --config.train.steps=500
#
# The array has one task per line of `saejax sweep STUDY --workdir WORKDIR --list` (also run
# by --dry-run, to size it). Array task I runs `srun saejax sweep STUDY --workdir WORKDIR
# --point I` on NODES nodes, one process per node with all of its GPUs; with NODES > 1 the
# processes join with jax.distributed from SLURM's variables (saejax.distributed).
# SLURM sends SIGTERM SIGNAL_SECONDS before the time limit (and on preemption): the
# trainer saves and exits 75, and the task requeues itself (`scontrol requeue`) to resume
# from that checkpoint; finished points are skipped, so resubmitting a sweep is safe.
#
# The job script is written to WORKDIR/slurm/sweep.sbatch and that file is submitted;
# --dry-run writes it too and prints the sbatch command and the script, submitting nothing.
# Logs: WORKDIR/slurm/<array job id>_<point>.out. WORKDIR must be on a filesystem every
# node sees.
#
# Settings (environment variables):
#   PARTITION       required: the SLURM partition to submit to
#   ACCOUNT, QOS    optional: --account, --qos
#   NODES           nodes per grid point (default 1)
#   GPUS_PER_NODE   GPUs per node (default 8; 0 requests none, for CPU partitions)
#   CPUS_PER_TASK   optional: --cpus-per-task (one task per node)
#   MEM             optional: --mem per node, e.g. 200G
#   TIME            time limit per array task (default 24:00:00)
#   MAX_PARALLEL    optional: run at most this many grid points at once (--array=...%N)
#   SIGNAL_SECONDS  seconds before the time limit that SIGTERM is sent (default 300)
#   JOB_NAME        default saejax-<study file name>
#   SAEJAX          the saejax executable (default: saejax on PATH, written into the script as an absolute path)
# Anything else sbatch reads from its own SBATCH_* variables (e.g. SBATCH_CONSTRAINT).
set -euo pipefail

usage="usage: [PARTITION=...] launch/slurm.sh [--dry-run] STUDY.py WORKDIR [--config.KEY=VALUE ...]"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
[[ $# -ge 2 ]] || { echo "$usage" >&2; echo "launch/slurm.sh: STUDY.py and WORKDIR are required" >&2; exit 2; }
study="$1" workdir="$2"
shift 2
for arg in "$@"; do
  case "$arg" in
    --parallel|--parallel=*|--one-pass|--group-size|--group-size=*|--gpus-per-run|--gpus-per-run=*|--point|--point=*|--list)
      echo "launch/slurm.sh: $arg is not for SLURM (each array task runs one --point); pass only --config.KEY=VALUE" >&2
      exit 2 ;;
  esac
done

: "${PARTITION:?set PARTITION=... (the SLURM partition to submit to)}"
nodes="${NODES:-1}"
gpus_per_node="${GPUS_PER_NODE:-8}"
time_limit="${TIME:-24:00:00}"
signal_seconds="${SIGNAL_SECONDS:-300}"
max_parallel="${MAX_PARALLEL:-}"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "NODES must be a positive integer, got '$nodes'" >&2; exit 2; }
[[ "$gpus_per_node" =~ ^[0-9]+$ ]] || { echo "GPUS_PER_NODE must be a non-negative integer, got '$gpus_per_node'" >&2; exit 2; }
[[ "$signal_seconds" =~ ^[1-9][0-9]*$ ]] || { echo "SIGNAL_SECONDS must be a positive integer, got '$signal_seconds'" >&2; exit 2; }
[[ -z "$max_parallel" || "$max_parallel" =~ ^[1-9][0-9]*$ ]] || { echo "MAX_PARALLEL must be a positive integer, got '$max_parallel'" >&2; exit 2; }

saejax_bin="$(command -v "${SAEJAX:-saejax}")" || {
  echo "'${SAEJAX:-saejax}' not found: install saejax (pip install -e .) or set SAEJAX=/path/to/saejax" >&2; exit 2; }
[[ -f "$study" ]] || { echo "launch/slurm.sh: study file '$study' not found" >&2; exit 2; }
study="$(cd "$(dirname "$study")" && pwd)/$(basename "$study")"
mkdir -p "$workdir/slurm"
workdir="$(cd "$workdir" && pwd)"

set +e
points="$("$saejax_bin" sweep "$study" --workdir "$workdir" --list "$@")"
code=$?
set -e
[[ $code -eq 0 ]] || { echo "launch/slurm.sh: 'saejax sweep --list' failed (exit $code)" >&2; exit "$code"; }
count=$(printf '%s' "$points" | grep -c '' || true)
[[ $count -gt 0 ]] || { echo "launch/slurm.sh: $study has no grid points" >&2; exit 2; }
# Lines are INDEX<TAB>RUN_NAME<TAB>POINT_JSON, indices 0..count-1: anything else means the
# array would not match the grid.
printf '%s\n' "$points" | awk -F'\t' '$1 != NR - 1 { exit 1 }' || {
  echo "launch/slurm.sh: 'saejax sweep --list' printed lines other than INDEX<TAB>RUN_NAME<TAB>POINT_JSON from 0:" >&2
  printf '%s\n' "$points" | head -n 5 >&2
  exit 2
}
array="0-$((count - 1))${max_parallel:+%$max_parallel}"
job_name="${JOB_NAME:-saejax-$(basename "$study" .py)}"

directives=(
  "--job-name=$job_name"
  "--partition=$PARTITION"
  ${ACCOUNT:+"--account=$ACCOUNT"}
  ${QOS:+"--qos=$QOS"}
  "--nodes=$nodes"
  "--ntasks-per-node=1"
)
if [[ $gpus_per_node -gt 0 ]]; then directives+=("--gpus-per-node=$gpus_per_node"); fi
if [[ -n "${CPUS_PER_TASK:-}" ]]; then directives+=("--cpus-per-task=$CPUS_PER_TASK"); fi
if [[ -n "${MEM:-}" ]]; then directives+=("--mem=$MEM"); fi
directives+=(
  "--time=$time_limit"
  "--array=$array"
  "--requeue"
  "--signal=TERM@$signal_seconds"
  "--open-mode=append"
  "--output=$workdir/slurm/%A_%a.out"
)

script="$workdir/slurm/sweep.sbatch"
{
  echo "#!/usr/bin/env bash"
  echo "# Written by launch/slurm.sh: grid point \$SLURM_ARRAY_TASK_ID of $study ($count points)."
  printf '#SBATCH %s\n' "${directives[@]}"
  # Everything below runs on the first node of each array task.
  cat <<'EOF'
set -uo pipefail  # no -e: srun's exit code decides what happens next
# --signal=TERM (no B:) signals the training processes, not this shell. A SIGTERM that
# does reach it (scancel, preemption) must not end it before srun returns the exit code:
# with a trap, bash runs the trap after srun and carries on.
trap 'echo "batch shell: SIGTERM; waiting for the training processes to save"' TERM
point="${SLURM_ARRAY_TASK_ID:?not a SLURM array task: submit this file with launch/slurm.sh}"
echo "grid point $point, job ${SLURM_ARRAY_JOB_ID}_${point}, restart ${SLURM_RESTART_COUNT:-0}, ${SLURM_JOB_NUM_NODES:-1} node(s)"
export PYTHONUNBUFFERED=1
# srun (SLURM >= 22.05) does not inherit --cpus-per-task from the allocation; the data feeder needs them.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
EOF
  # shellcheck disable=SC2016  # "$point" is expanded by the job script, not here
  printf 'srun %q sweep %q --workdir %q --point "$point"' "$saejax_bin" "$study" "$workdir"
  if [[ $# -gt 0 ]]; then printf ' %q' "$@"; fi
  echo
  cat <<'EOF'
code=$?
if [[ $code -eq 75 ]]; then  # preempted after saving: run again from the checkpoint
  echo "grid point $point: preempted and saved; requeueing ${SLURM_ARRAY_JOB_ID}_${point}"
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${point}" ||
    echo "scontrol requeue failed; resubmit with launch/slurm.sh (finished points are skipped)" >&2
fi
exit "$code"
EOF
} > "$script"

submit=(sbatch --parsable "$script")
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${submit[@]}"; echo
  cat "$script"
  exit 0
fi
command -v sbatch >/dev/null || { echo "sbatch not found: run launch/slurm.sh on a SLURM login node" >&2; exit 2; }
job_id="$("${submit[@]}")"
job_id="${job_id%%;*}"  # --parsable prints ID or ID;CLUSTER
echo "submitted array job $job_id: $count grid point(s) of $study, logs in $workdir/slurm/${job_id}_<point>.out"

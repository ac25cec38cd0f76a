"""launch/*.sh without a cluster: fake saejax, srun, scontrol, sbatch and gcloud on PATH record their calls.

Dry runs must print exactly the command (and for SLURM the job script) that a
real run uses; the SLURM job script is executed with SLURM's variables set to
check what it does with each exit code.
"""

import os
import shlex
import subprocess
import textwrap

import pytest

from helpers import REPO

LAUNCH = os.path.join(REPO, "launch")

FAKE_SAEJAX = r"""#!/usr/bin/env bash
# Records its arguments; --list prints FAKE_POINTS grid lines; other calls exit FAKE_EXIT
# (or exit FAKE_EXIT only for --point FAKE_FAIL_POINT).
echo "saejax $* [SAEJAX_DISTRIBUTED=${SAEJAX_DISTRIBUTED:-}]" >> "$FAKE_LOG"
if [[ " $* " == *" --list "* ]]; then
  for ((i = 0; i < ${FAKE_POINTS:-3}; i++)); do printf '%d\trun_%d\t{"n": %d}\n' "$i" "$i" "$i"; done
  exit 0
fi
if [[ -n "${FAKE_FAIL_POINT:-}" ]]; then
  [[ " $* " == *" --point $FAKE_FAIL_POINT "* ]] && exit "${FAKE_EXIT:-0}"
  exit 0
fi
exit "${FAKE_EXIT:-0}"
"""
FAKE_RECORDER = """#!/usr/bin/env bash
echo "{name} $*" >> "$FAKE_LOG"
{tail}
"""
FAKES = {
    "saejax": FAKE_SAEJAX,
    "srun": FAKE_RECORDER.format(name="srun", tail='exec "$@"'),
    "scontrol": FAKE_RECORDER.format(name="scontrol", tail=""),
    "sbatch": FAKE_RECORDER.format(name="sbatch", tail="echo 4242"),
    "gcloud": FAKE_RECORDER.format(name="gcloud", tail=""),
}
LAUNCH_VARS = ("PARTITION", "ACCOUNT", "QOS", "NODES", "GPUS_PER_NODE", "CPUS_PER_TASK", "MEM", "TIME", "MAX_PARALLEL",
               "SIGNAL_SECONDS", "JOB_NAME", "SAEJAX", "TPU_NAME", "ZONE", "PROJECT", "SAEJAX_CPU_DEVICES",
               "SAEJAX_RETRIES")


class Fakes:
    def __init__(self, tmp_path):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name, text in FAKES.items():
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)
        self.log = tmp_path / "calls.log"
        self.log.write_text("")
        self.study = tmp_path / "studies" / "nk.py"
        self.study.parent.mkdir()
        self.study.write_text("# a study\n")
        self.workdir = tmp_path / "runs" / "nk"

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "SBATCH_"))}
        env.update(PATH=f"{self.bin}:{env['PATH']}", FAKE_LOG=str(self.log))
        env.update(extra)
        return env

    def run(self, script, *args, cwd=None, **env):
        return subprocess.run(["bash", os.path.join(LAUNCH, script), *map(str, args)], capture_output=True,
                              text=True, env=self.env(**env), cwd=cwd, timeout=60)

    def calls(self):
        return self.log.read_text().splitlines()


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path)


def slurm_script(fakes, directives, extra=""):
    workdir, study, saejax = fakes.workdir, fakes.study, fakes.bin / "saejax"
    header = "\n".join(f"#SBATCH {d}" for d in directives)
    return textwrap.dedent("""\
        #!/usr/bin/env bash
        # Written by launch/slurm.sh: grid point $SLURM_ARRAY_TASK_ID of {study} (3 points).
        {header}
        set -uo pipefail  # no -e: srun's exit code decides what happens next
        # --signal=TERM (no B:) signals the training processes, not this shell. A SIGTERM that
        # does reach it (scancel, preemption) must not end it before srun returns the exit code:
        # with a trap, bash runs the trap after srun and carries on.
        trap 'echo "batch shell: SIGTERM; waiting for the training processes to save"' TERM
        point="${{SLURM_ARRAY_TASK_ID:?not a SLURM array task: submit this file with launch/slurm.sh}}"
        echo "grid point $point, job ${{SLURM_ARRAY_JOB_ID}}_${{point}}, restart ${{SLURM_RESTART_COUNT:-0}}, ${{SLURM_JOB_NUM_NODES:-1}} node(s)"
        export PYTHONUNBUFFERED=1
        # srun (SLURM >= 22.05) does not inherit --cpus-per-task from the allocation; the data feeder needs them.
        if [[ -n "${{SLURM_CPUS_PER_TASK:-}}" ]]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
        srun {saejax} sweep {study} --workdir {workdir} --point "$point"{extra}
        code=$?
        if [[ $code -eq 75 ]]; then  # preempted after saving: run again from the checkpoint
          echo "grid point $point: preempted and saved; requeueing ${{SLURM_ARRAY_JOB_ID}}_${{point}}"
          scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{point}}" ||
            echo "scontrol requeue failed; resubmit with launch/slurm.sh (finished points are skipped)" >&2
        fi
        exit "$code"
        """).format(study=study, header=header, saejax=saejax, workdir=workdir, extra=extra)


# ------------------------------------------------------------------ SLURM


def test_slurm_dry_run_prints_the_sbatch_command_and_the_job_script(fakes):
    result = fakes.run("slurm.sh", "--dry-run", fakes.study, fakes.workdir, "--config.train.steps=500",
                       "--config.data.path=/data/my acts", PARTITION="gpu", NODES="2", ACCOUNT="sae",
                       MAX_PARALLEL="2", TIME="12:00:00")
    assert result.returncode == 0, result.stderr
    script_path = fakes.workdir / "slurm" / "sweep.sbatch"
    command, _, script = result.stdout.partition("\n")
    assert command == f"sbatch --parsable {script_path} "
    expected = slurm_script(fakes, [
        "--job-name=saejax-nk", "--partition=gpu", "--account=sae", "--nodes=2", "--ntasks-per-node=1",
        "--gpus-per-node=8", "--time=12:00:00", "--array=0-2%2", "--requeue", "--signal=TERM@300",
        "--open-mode=append", f"--output={fakes.workdir}/slurm/%A_%a.out",
    ], extra=r" --config.train.steps=500 --config.data.path=/data/my\ acts")
    assert script == expected
    assert script_path.read_text() == expected, "the dry run shows the file a real run submits"
    # Only the grid was listed (to size the array); nothing was submitted or run.
    assert fakes.calls() == [f"saejax sweep {fakes.study} --workdir {fakes.workdir} --list "
                             "--config.train.steps=500 --config.data.path=/data/my acts [SAEJAX_DISTRIBUTED=]"]


def test_slurm_relative_paths_become_absolute_and_cpu_partitions_request_no_gpus(fakes):
    result = fakes.run("slurm.sh", "--dry-run", "studies/nk.py", "runs/nk", cwd=fakes.study.parent.parent,
                       PARTITION="cpu", GPUS_PER_NODE="0", SIGNAL_SECONDS="120", JOB_NAME="grid")
    assert result.returncode == 0, result.stderr
    assert result.stdout.partition("\n")[2] == slurm_script(fakes, [
        "--job-name=grid", "--partition=cpu", "--nodes=1", "--ntasks-per-node=1", "--time=24:00:00",
        "--array=0-2", "--requeue", "--signal=TERM@120", "--open-mode=append",
        f"--output={fakes.workdir}/slurm/%A_%a.out"])


def test_slurm_submits_the_job_script(fakes):
    result = fakes.run("slurm.sh", fakes.study, fakes.workdir, PARTITION="gpu", FAKE_POINTS="12")
    assert result.returncode == 0, result.stderr
    script = fakes.workdir / "slurm" / "sweep.sbatch"
    assert fakes.calls()[-1] == f"sbatch --parsable {script}"
    assert "#SBATCH --array=0-11\n" in script.read_text()
    assert result.stdout == (f"submitted array job 4242: 12 grid point(s) of {fakes.study}, "
                             f"logs in {fakes.workdir}/slurm/4242_<point>.out\n")


@pytest.mark.parametrize("args, env, message", [
    (["STUDY", "WORKDIR"], {}, "PARTITION: set PARTITION=... (the SLURM partition to submit to)"),
    ([], {"PARTITION": "gpu"}, "launch/slurm.sh: STUDY.py and WORKDIR are required"),
    (["STUDY", "WORKDIR", "--parallel", "2"], {"PARTITION": "gpu"},
     "launch/slurm.sh: --parallel is not for SLURM (each array task runs one --point); pass only --config.KEY=VALUE"),
    (["STUDY", "WORKDIR"], {"PARTITION": "gpu", "NODES": "two"}, "NODES must be a positive integer, got 'two'"),
    (["STUDY", "WORKDIR"], {"PARTITION": "gpu", "MAX_PARALLEL": "0"}, "MAX_PARALLEL must be a positive integer, got '0'"),
    (["STUDY", "WORKDIR"], {"PARTITION": "gpu", "SAEJAX": "no-such-saejax"},
     "'no-such-saejax' not found: install saejax (pip install -e .) or set SAEJAX=/path/to/saejax"),
    (["missing.py", "WORKDIR"], {"PARTITION": "gpu"}, "launch/slurm.sh: study file 'missing.py' not found"),
    (["STUDY", "WORKDIR"], {"PARTITION": "gpu", "FAKE_POINTS": "0"}, "has no grid points"),
])
def test_slurm_missing_or_bad_settings_fail_fast(fakes, args, env, message):
    args = [{"STUDY": fakes.study, "WORKDIR": fakes.workdir}.get(a, a) for a in args]
    result = fakes.run("slurm.sh", "--dry-run", *args, **env)
    assert result.returncode != 0
    assert message in result.stderr
    assert not any(call.startswith("sbatch") for call in fakes.calls())


def test_slurm_refuses_a_list_that_is_not_the_grid(fakes):
    noisy = fakes.bin / "saejax"
    noisy.write_text("#!/usr/bin/env bash\necho 'warning: something'\nprintf '0\\trun_0\\t{}\\n'\n")
    result = fakes.run("slurm.sh", "--dry-run", fakes.study, fakes.workdir, PARTITION="gpu")
    assert result.returncode == 2
    assert "printed lines other than INDEX<TAB>RUN_NAME<TAB>POINT_JSON from 0" in result.stderr


@pytest.mark.parametrize("exit_code, requeued", [(75, True), (0, False), (2, False), (3, False)])
def test_slurm_job_script_requeues_only_a_preempted_point(fakes, exit_code, requeued):
    assert fakes.run("slurm.sh", "--dry-run", fakes.study, fakes.workdir, "--config.seed=1",
                     PARTITION="gpu").returncode == 0
    fakes.log.write_text("")
    script = fakes.workdir / "slurm" / "sweep.sbatch"
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "79", "SLURM_JOB_NUM_NODES": "1"}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                            env=fakes.env(FAKE_EXIT=str(exit_code), **slurm))
    assert result.returncode == exit_code, result.stderr
    command = f"{fakes.bin / 'saejax'} sweep {fakes.study} --workdir {fakes.workdir} --point 1 --config.seed=1"
    expected = [f"srun {command}", f"saejax sweep {fakes.study} --workdir {fakes.workdir} --point 1 "
                                   "--config.seed=1 [SAEJAX_DISTRIBUTED=]"]
    if requeued:
        expected.append("scontrol requeue 77_1")
        assert "grid point 1: preempted and saved; requeueing 77_1" in result.stdout
    assert fakes.calls() == expected


def test_slurm_job_script_outside_an_array_task_says_so(fakes):
    fakes.run("slurm.sh", "--dry-run", fakes.study, fakes.workdir, PARTITION="gpu")
    result = subprocess.run(["bash", str(fakes.workdir / "slurm" / "sweep.sbatch")], capture_output=True, text=True,
                            env=fakes.env(), timeout=60)
    assert result.returncode != 0
    assert "not a SLURM array task: submit this file with launch/slurm.sh" in result.stderr


# ------------------------------------------------------------------ TPU VM


def _gcloud(remote, project=None):
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sae-v4-32", "--zone", "us-central2-b"]
    if project:
        cmd += ["--project", project]
    return cmd + ["--worker=all", "--command", remote]


def _printed(cmd):
    """What `printf '%q ' CMD; echo` prints, parsed back into words."""
    return shlex.split(cmd)


TPU = {"TPU_NAME": "sae-v4-32", "ZONE": "us-central2-b"}


def test_tpu_vm_dry_run_one_point(fakes):
    result = fakes.run("tpu_vm.sh", "--dry-run", "studies/nk.py", "/mnt/shared/nk", "3", "--config.seed=1",
                       PROJECT="my-proj", **TPU)
    assert result.returncode == 0, result.stderr
    remote = ("export SAEJAX_DISTRIBUTED=jax PYTHONUNBUFFERED=1; saejax sweep studies/nk.py --workdir /mnt/shared/nk "
              "--point 3 --config.seed=1")
    assert _printed(result.stdout) == _gcloud(remote, "my-proj")
    assert result.stdout == (r"gcloud compute tpus tpu-vm ssh sae-v4-32 --zone us-central2-b --project my-proj "
                             r"--worker=all --command export\ SAEJAX_DISTRIBUTED=jax\ PYTHONUNBUFFERED=1\;\ saejax\ "
                             r"sweep\ studies/nk.py\ --workdir\ /mnt/shared/nk\ --point\ 3\ --config.seed=1 " "\n")
    assert fakes.calls() == []


def test_tpu_vm_dry_run_train(fakes):
    result = fakes.run("tpu_vm.sh", "--dry-run", "train", "/mnt/shared/gpt2", "gpt2_small", "--config.sae.k=64",
                       SAEJAX="~/venv/bin/saejax", **TPU)
    assert result.returncode == 0, result.stderr
    assert _printed(result.stdout) == _gcloud(
        r"export SAEJAX_DISTRIBUTED=jax PYTHONUNBUFFERED=1; \~/venv/bin/saejax train --config gpt2_small "
        "--workdir /mnt/shared/gpt2 --config.sae.k=64")


def test_tpu_vm_whole_sweep_runs_point_after_point_and_stops_at_a_preemption(fakes):
    result = fakes.run("tpu_vm.sh", "--dry-run", fakes.study, fakes.workdir, "all", **TPU)
    assert result.returncode == 0, result.stderr
    remote = _printed(result.stdout)[-1]
    sweep = f"saejax sweep {fakes.study} --workdir {fakes.workdir}"
    assert remote == (f"set -eo pipefail; export SAEJAX_DISTRIBUTED=jax PYTHONUNBUFFERED=1; n=$({sweep} --list | wc -l);"
                      f' for i in $(seq 0 $((n - 1))); do {sweep} --point "$i"; done')
    # What each worker runs, here with the fake saejax: point 1 is preempted (75), point 2 never starts.
    worker = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, timeout=60,
                            env=fakes.env(FAKE_POINTS="3", FAKE_FAIL_POINT="1", FAKE_EXIT="75"))
    assert worker.returncode == 75
    assert fakes.calls() == [f"{sweep} {arg} [SAEJAX_DISTRIBUTED=jax]" for arg in ("--list", "--point 0", "--point 1")]


def test_tpu_vm_runs_gcloud(fakes):
    result = fakes.run("tpu_vm.sh", "train", "/mnt/w", **TPU)
    assert result.returncode == 0, result.stderr
    assert fakes.calls() == ["gcloud compute tpus tpu-vm ssh sae-v4-32 --zone us-central2-b --worker=all --command "
                             "export SAEJAX_DISTRIBUTED=jax PYTHONUNBUFFERED=1; saejax train --config default "
                             "--workdir /mnt/w"]


@pytest.mark.parametrize("args, env, message", [
    (["s.py", "w", "0"], {"ZONE": "z"}, "TPU_NAME: set TPU_NAME=... (the Cloud TPU VM to run on)"),
    (["s.py", "w", "0"], {"TPU_NAME": "t"}, "ZONE: set ZONE=... (the zone of the TPU VM, e.g. us-central2-b)"),
    (["s.py", "w"], TPU, "launch/tpu_vm.sh: STUDY.py, WORKDIR and POINT (a grid index, or all) are required"),
    (["s.py", "w", "first"], TPU, "launch/tpu_vm.sh: POINT must be a grid index (0, 1, ...) or all, got 'first'"),
    ([], TPU, "usage: TPU_NAME=... ZONE=... launch/tpu_vm.sh"),
])
def test_tpu_vm_missing_settings_fail_fast(fakes, args, env, message):
    result = fakes.run("tpu_vm.sh", "--dry-run", *args, **env)
    assert result.returncode != 0
    assert message in result.stderr
    assert fakes.calls() == []


# ------------------------------------------------------------------ local


def test_local_sweep_dry_run(fakes):
    result = fakes.run("local.sh", "--dry-run", "sweep", "studies/nk.py", "runs/nk", "--parallel", "2",
                       "--config.train.steps=100", SAEJAX_CPU_DEVICES="4")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("env PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=4 saejax sweep studies/nk.py "
                             "--workdir runs/nk --parallel 2 --config.train.steps=100 \n")
    missing = fakes.run("local.sh", "sweep", "studies/nk.py")
    assert missing.returncode == 2 and "launch/local.sh sweep: STUDY.py and WORKDIR are required" in missing.stderr


def test_local_sweep_runs_logs_and_retries_after_a_preemption(fakes):
    # The fake exits 75 until the retry budget is spent: one run plus two retries, then 75 stays.
    result = fakes.run("local.sh", "sweep", fakes.study, fakes.workdir, "--one-pass", FAKE_EXIT="75",
                       SAEJAX_RETRIES="2")
    assert result.returncode == 75
    sweep = f"saejax sweep {fakes.study} --workdir {fakes.workdir} --one-pass [SAEJAX_DISTRIBUTED=]"
    assert fakes.calls() == [sweep] * 3
    assert (fakes.workdir / "sweep.log").read_text().count("preempted; state saved; restarting") == 2


def test_local_train_usage_unchanged(fakes):
    result = fakes.run("local.sh", "--dry-run", "runs/x", "default:n=2048", "--config.sae.k=4")
    assert result.stdout == "env PYTHONUNBUFFERED=1 saejax train --config default:n=2048 --workdir runs/x --config.sae.k=4 \n"
    done = fakes.run("local.sh", fakes.workdir)
    assert done.returncode == 0 and fakes.calls() == [
        f"saejax train --config default --workdir {fakes.workdir} [SAEJAX_DISTRIBUTED=]"]
    assert (fakes.workdir / "train.log").exists()

"""What a run survives: a full disk, a bad or busy workdir, too little data.

Runs go through `saejax.cli.main` in this process (exit code and the one
error line, as a user sees them) on the tiny `small_config`; the concurrent
start uses two real processes. Full disks are tmpfs mounts sized from a
measured run (root only; skipped with the reason otherwise).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from saejax import cli
from saejax.errors import EXIT_BUSY, EXIT_IO, EXIT_OK, EXIT_USAGE, WorkdirBusyError
from saejax.workdir import LOCK_FILE, WorkdirLock

PAGE = 4096
TINY = {"train.steps": 4, "checkpoint.every_steps": 2, "checkpoint.async_save": True, "train.log_every": 1000}


def _config_file(tmp_path, **overrides) -> str:
    path = tmp_path / f"config_{abs(hash(json.dumps(overrides, sort_keys=True)))}.py"
    path.write_text(f"import sys\nsys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
                    "from helpers import small_config\n\n\n"
                    f"def get_config(arg=None):\n    return small_config(**{overrides!r})\n")
    return str(path)


def _train(capsys, config: str, workdir, *extra) -> tuple[int, str]:
    code = cli.main(["train", "--config", config, "--workdir", str(workdir), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("saejax train: error:")]


@contextlib.contextmanager
def _tmpfs(path, size: int):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _pages(path) -> int:
    """Bytes a tmpfs charges for the files under `path` (whole pages)."""
    if os.path.isfile(path):
        return -(-os.path.getsize(path) // PAGE) * PAGE
    return sum(_pages(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _used(mount) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _weights(workdir) -> bytes:
    with open(os.path.join(workdir, "sae.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A full run on a roomy tmpfs: the reference weights and what each file costs there."""
    root = tmp_path_factory.mktemp("measured")
    with _tmpfs(root / "mnt", 64 * 2**20) as mount:
        config = _config_file(root, **TINY)
        workdir = os.path.join(mount, "run")
        assert cli.main(["train", "--config", config, "--workdir", workdir]) == EXIT_OK
        exported = sum(_pages(os.path.join(workdir, f)) for f in ("sae.safetensors", "cfg.json", "results.json"))
        yield {"config": config, "weights": _weights(workdir), "used": _used(mount), "exported": exported,
               "last_checkpoint": _pages(os.path.join(workdir, "checkpoints", "4")),
               "export": _pages(os.path.join(workdir, "sae.safetensors"))}


def test_a_disk_too_small_for_a_checkpoint_stops_there_then_resumes_bit_exact(measured, tmp_path, capsys):
    # Room for everything up to the step-2 checkpoint and half of the step-4 one.
    before_last = measured["used"] - measured["exported"] - measured["last_checkpoint"]
    size = before_last + measured["last_checkpoint"] // 2 // PAGE * PAGE
    with _tmpfs(tmp_path / "small", size) as mount:
        workdir = os.path.join(mount, "run")
        code, errors = _train(capsys, measured["config"], workdir)
        assert code == EXIT_IO, errors
        assert errors == [f"saejax train: error: writing checkpoint step 4 to {workdir}/checkpoints failed "
                          "([Errno 28] No space left on device). Training stopped; the last complete one, step 2, "
                          "is intact. Free space there (or move the workdir) and run the same command to resume."]
        assert sorted(p for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit()) == ["2"]
        assert not os.path.exists(os.path.join(workdir, "sae.safetensors"))
        subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
        code, errors = _train(capsys, measured["config"], workdir)
        assert code == EXIT_OK, errors
        assert _weights(workdir) == measured["weights"], "resumed from step 2 bit-exact"


def test_a_disk_too_small_for_the_export_is_one_line_and_leaves_no_tmp(measured, tmp_path, capsys, monkeypatch):
    import saejax.trainer

    export = saejax.trainer.export_sae

    def export_onto_a_full_disk(directory, tensors, cfg):  # the disk fills up as training ends
        stats = os.statvfs(directory)
        with open(os.path.join(directory, "..", "filler"), "wb") as f:
            f.write(b"\0" * (stats.f_bavail * stats.f_frsize - measured["export"] // 2 // PAGE * PAGE))
        return export(directory, tensors, cfg)

    with _tmpfs(tmp_path / "small", 16 * 2**20) as mount:
        workdir = os.path.join(mount, "run")
        monkeypatch.setattr(saejax.trainer, "export_sae", export_onto_a_full_disk)
        code, errors = _train(capsys, measured["config"], workdir)
        assert code == EXIT_IO, errors
        assert errors == [f"saejax train: error: writing the exported SAE {workdir}/sae.safetensors failed "
                          "([Errno 28] No space left on device). The checkpoints are intact: free space there and "
                          "run the same command again; it exports without training again."]
        assert not [f for f in os.listdir(workdir) if f.startswith("sae.safetensors")], "no tmp left behind"
        assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))
        monkeypatch.undo()
        os.remove(os.path.join(mount, "filler"))
        code, errors = _train(capsys, measured["config"], workdir)
        assert code == EXIT_OK, errors
        assert _weights(workdir) == measured["weights"]


# ---------------------------------------------------------------------------- bad workdirs


def test_bad_workdirs_are_exit_2_before_anything_is_compiled(tmp_path, capsys):
    config = _config_file(tmp_path, **TINY)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, errors = _train(capsys, config, a_file)
    assert (code, errors) == (EXIT_USAGE, [f"saejax train: error: --workdir {a_file} is a file, not a directory; "
                                           "pass a directory (created if absent)"])
    under = a_file / "run"
    code, errors = _train(capsys, config, under)
    assert code == EXIT_USAGE
    assert errors == [f"saejax train: error: --workdir {under} cannot be created (Not a directory: {under}); "
                      "pass a path whose parents are directories you can write to"]
    with _tmpfs(tmp_path / "ro", 2**20) as mount:
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
        workdir = os.path.join(mount, "run")
        code, errors = _train(capsys, config, workdir)
        assert code == EXIT_USAGE
        assert errors == [f"saejax train: error: --workdir {workdir} cannot be created (Read-only file system: "
                          f"{workdir}); pass a path whose parents are directories you can write to"]
        subprocess.run(["mount", "-o", "remount,rw", mount], check=True)
        os.makedirs(workdir)
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
        code, errors = _train(capsys, config, workdir)
        assert code == EXIT_USAGE
        assert errors == [f"saejax train: error: --workdir {workdir} is not writable (Read-only file system); "
                          "pass a directory on a writable filesystem"]


# ---------------------------------------------------------------------------- too little data


def test_a_dataset_smaller_than_one_batch_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / "ten.npy"
    np.save(path, np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32))
    config = _config_file(tmp_path, **{**TINY, "data.source": "npy", "data.path": str(path),
                                       "data.batch_size": 512})
    workdir = tmp_path / "run"
    code, errors = _train(capsys, config, workdir)
    assert code == EXIT_USAGE
    assert errors == [f"saejax train: error: npy({path}, 10 rows x d=16) has 10 training row(s) (of 10), fewer than "
                      "one batch of data.batch_size=512: lower --config.data.batch_size to at most 10, "
                      "or use more data"]
    assert not (workdir / "checkpoints").exists()

    code, errors = _train(capsys, config, workdir, "--config.data.batch_size=8")
    assert code == EXIT_USAGE, "0.01 of 10 rows rounds to no held-out row"
    assert errors == [f"saejax train: error: npy({path}, 10 rows x d=16): data.eval_fraction=0.01 of its 10 rows "
                      "holds out none for the 1 evaluation batch(es) (train.eval_batches): raise "
                      "--config.data.eval_fraction so that it holds out at least one row, or set "
                      "--config.train.eval_batches=0"]


def test_a_d0_file_is_not_told_to_set_d_0(tmp_path, capsys):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((100, 0), np.float32))
    config = _config_file(tmp_path, **{**TINY, "data.source": "npy", "data.path": str(path)})
    code, errors = _train(capsys, config, tmp_path / "run")
    assert code == EXIT_USAGE and "d=0" in errors[0] and "sae.d=0" not in errors[0], errors


# ---------------------------------------------------------------------------- one run per workdir


HOLD = "import sys, time; from saejax.workdir import WorkdirLock; lock = WorkdirLock(sys.argv[1]); lock.acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def test_a_held_lock_names_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(WorkdirBusyError, match=rf"^{tmp_path} is in use: PID {holder.pid} on host "
                                                   rf"{socket.gethostname()} \(since .*\) is training in it\."):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()  # the dead holder's lock file is still there; the kernel dropped its flock
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_two_trainers_started_together_exactly_one_trains(measured, tmp_path):
    workdir = str(tmp_path / "run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "saejax", "train", "--config", measured["config"], "--workdir", workdir]
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [EXIT_OK, EXIT_BUSY], outputs
    loser = [i for i, proc in enumerate(procs) if proc.returncode == EXIT_BUSY][0]
    winner = procs[1 - loser]
    errors = [line for line in outputs[loser][1].splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"saejax train: error: {workdir} is in use: PID {winner.pid} "
                                                     f"on host {socket.gethostname()}"), outputs[loser]
    assert "Traceback" not in outputs[loser][1]
    assert _weights(workdir) == measured["weights"], "the one run is the run trained alone"


def test_leftovers_of_an_interrupted_export_are_removed_on_the_next_start(measured, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "sae.safetensors.tmp").write_bytes(b"half an export")
    code, errors = _train(capsys, measured["config"], workdir)
    assert code == EXIT_OK, errors
    assert not (workdir / "sae.safetensors.tmp").exists()
    assert _weights(workdir) == measured["weights"]

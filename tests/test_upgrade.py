"""`saejax upgrade`: a trained SAE -> Rational SAE; stage 1 starts where the teacher is; bad input."""

import json
import os

import numpy as np
import pytest

from helpers import small_config
from saejax.data import make_source
from saejax.errors import ConfigError
from saejax.export import load_sae
from saejax.results import write_results
from saejax.trainer import train_and_evaluate
from saejax.upgrade import upgrade

TEACHER = {"sae.family": "relu", "train.steps": 20, "sae.relu.l1_warmup_steps": 5}
STAGE1_TOLERANCE = 1e-4  # sum ||x_hat_teacher - x_hat_stage1||^2 / sum ||x - mean x||^2 (measured ~1e-6)


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    root = tmp_path_factory.mktemp("upgrade")
    teacher_dir, out = str(root / "teacher"), str(root / "rsae")
    config = small_config(**TEACHER)
    train_and_evaluate(config, teacher_dir)
    report = upgrade(teacher_dir, out, [("train.steps", "3")], log=lambda m: None)
    return config, teacher_dir, out, report


def test_stage_one_reproduces_the_teachers_reconstructions(upgraded):
    config, teacher_dir, out, report = upgraded
    x = make_source(config).read(0, 256, "eval")  # held-out rows
    teacher, stage1 = load_sae(teacher_dir), load_sae(os.path.join(out, "stage1"))
    assert stage1.cfg["family"] == "rational" and stage1.cfg["options"]["teacher"] == "relu"
    r_teacher, r_stage1 = teacher.reconstruct(x), stage1.reconstruct(x)
    gap = np.sum((r_teacher - r_stage1) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert gap < STAGE1_TOLERANCE, gap
    # The codes agree latent by latent too: the same support (pre > 0), close values.
    z_teacher, z_stage1 = teacher.dense_codes(x), stage1.dense_codes(x)
    np.testing.assert_array_equal(z_teacher > 0, z_stage1 != 0)
    assert np.linalg.norm(z_teacher - z_stage1) < 0.05 * np.linalg.norm(z_teacher)  # measured 0.01-0.025
    rows = report["heldout_rows"]
    assert rows["stage1"]["nmse"] == pytest.approx(rows["teacher"]["nmse"], abs=1e-3)
    assert rows["stage1"]["l0"] == rows["teacher"]["l0"]


def test_the_upgrade_is_an_ordinary_run(upgraded):
    config, teacher_dir, out, report = upgraded
    assert {"checkpoints", "sae.safetensors", "cfg.json", "results.json", "eval.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["family"] == "rational" and results["steps"] == 3
    assert results["config"]["sae"]["rational"]["init_from"] == teacher_dir
    assert results["config"]["sae"]["relu"]["l1_warmup_steps"] == 5  # the teacher's own options
    student = load_sae(out)
    assert student.cfg["options_of"]["relu"]["l1_coef"] == config.sae.relu.l1_coef
    x = make_source(config).read(0, 64, "eval")
    recon = student.reconstruct(x * np.float32(results["normalization"]["scale"]), normalized=True)
    xn = x * np.float32(results["normalization"]["scale"])
    nmse = np.sum((xn - recon) ** 2) / np.sum((xn - xn.mean(0)) ** 2)
    assert float(nmse) == pytest.approx(report["heldout_rows"]["student"]["nmse"], rel=1e-4)
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["heldout_rows"] == report["heldout_rows"]


def _fake_run(path, family, options, config_overrides):
    """A run directory with cfg.json, an (unread) sae.safetensors and results.json's config."""
    os.makedirs(path)
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump({"family": family, "d": 16, "n": 256, "options": options, "normalization": {"scale": 1.0}}, f)
    open(os.path.join(path, "sae.safetensors"), "wb").close()
    write_results(str(path), {"config": small_config(**config_overrides).to_dict()})
    return str(path)


def test_bad_input_is_refused_with_a_clear_error(upgraded, tmp_path):
    _, teacher_dir, _, _ = upgraded
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as e:
        upgrade(missing, str(tmp_path / "a"))
    assert str(e.value) == f"--from {missing}: no such run directory"

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "cfg.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        upgrade(str(incomplete), str(tmp_path / "b"))
    assert str(e.value) == (f"--from {incomplete}: the run is incomplete (no sae.safetensors); finish it "
                            "(`saejax train` again with the same --workdir) or import an SAE there (`saejax import`)")

    with pytest.raises(ConfigError) as e:
        upgrade(teacher_dir, str(tmp_path / "c"), [("sae.rational.p", "40")])
    assert str(e.value) == "sae.rational.p=40 must be between 1 and 16 (numerator degree)"
    with pytest.raises(ConfigError) as e:
        upgrade(teacher_dir, str(tmp_path / "c"), [("sae.rational.q", "-1")])
    assert str(e.value) == "sae.rational.q=-1 must be between 0 and 16 (denominator degree)"

    gated = _fake_run(tmp_path / "gated", "gated", {}, {"sae.family": "gated"})
    with pytest.raises(ConfigError) as e:
        upgrade(gated, str(tmp_path / "d"))
    assert str(e.value) == (f"--from {gated}: a gated SAE cannot be upgraded: its magnitude and gate paths are two "
                            "encoders; there is no single scalar gate to replace; the families that can: "
                            "relu, jumprelu, topk, batchtopk")

    topk = _fake_run(tmp_path / "topk", "topk", {"k": 8}, {})
    with pytest.raises(ConfigError) as e:
        upgrade(topk, str(tmp_path / "e"))
    assert str(e.value) == ("sae.rational.threshold is unset and a topk teacher has no threshold of its own: set "
                            "sae.rational.threshold=TAU, the separating threshold of the fitted gate t * 1[t >= TAU] "
                            "on the selected values (0 keeps the teacher's ReLU)")
    for name in "abcde":
        assert not os.path.exists(tmp_path / name), "a refused upgrade writes nothing"

    imported = tmp_path / "imported"
    imported.mkdir()
    for name in ("cfg.json", "sae.safetensors"):
        os.symlink(os.path.join(teacher_dir, name), imported / name)
    with pytest.raises(ConfigError) as e:
        upgrade(str(imported), str(tmp_path / "f"))
    assert str(e.value) == (f"--from {imported}: an imported SAE (no results.json) has no data of its own: "
                            "say which activations to fine-tune on with --store STORE")


def test_the_command_line(upgraded, tmp_path, capsys):
    from saejax.cli import main

    _, teacher_dir, _, _ = upgraded
    missing = str(tmp_path / "nowhere")
    assert main(["upgrade", "--from", missing, "--workdir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"saejax upgrade: error: --from {missing}: no such run directory"
    out = str(tmp_path / "cli")
    assert main(["upgrade", "--from", teacher_dir, "--workdir", out, "--config.train.steps=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = lines.index(f"upgraded relu -> rational (3, 2): {out}")  # after the trainer's plan
    assert [line.split()[0] for line in lines[first + 1:first + 4]] == ["teacher", "stage1", "student"]
    assert lines[first + 4] == f"  eval:    {os.path.join(out, 'eval.json')}"
    assert load_sae(out).cfg["family"] == "rational"

"""Scaling-law fits: known parameters come back inside their CIs, outliers barely matter, bad input is refused
with a message, `saejax fit` writes what it says, and the notebook runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from saejax.cli import main as cli_main
from saejax.errors import ConfigError, DataError
from saejax.scaling import (fit_joint_law, fit_power_law, fit_sweep, format_table, get_law, load_results,
                            plot_dead_vs_n, plot_frontier, plot_loss_vs_n)
from saejax.scaling.table import group_label

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOOTSTRAP = 200  # enough for the checks here; the default 1000 is for reports
JOINT_TRUE = dict(alpha=0.7, beta_k=-0.2, beta_n=-0.25, gamma=-0.03, zeta=-2.0, eta=-0.5)


def _noisy(values, sigma=0.02, seed=0):
    """Multiplicative (lognormal) noise, like seed-to-seed variation of a loss."""
    values = np.asarray(values, dtype=float)
    return values * np.exp(np.random.default_rng(seed).normal(0.0, sigma, values.shape))


def _power_law_points(a, b, c, x):
    return _noisy(a * np.asarray(x, dtype=float) ** b + c)


def _assert_recovered(fit, truth, tolerance):
    for name, true in truth.items():
        low, high = fit.ci[name]
        assert low <= true <= high, f"{name}: true {true} outside CI [{low}, {high}] (estimate {fit.params[name]})"
        assert fit.params[name] == pytest.approx(true, abs=tolerance[name]), name


# ---------------------------------------------------------------- the fitter


def test_power_law_in_n_recovers_known_parameters():
    truth = dict(a=2.0, b=-0.35, c=0.05)
    n = 2.0 ** np.arange(8, 18)
    fit = fit_power_law(n, _power_law_points(**truth, x=n), n_bootstrap=BOOTSTRAP, confidence=0.99, seed=0)
    _assert_recovered(fit, truth, dict(a=0.3, b=0.025, c=0.01))
    assert fit.law == "L(n)" and fit.n_points == 10
    assert fit.rms_log_residual == pytest.approx(0.02, abs=0.01)  # the noise we put in, not more
    assert fit.n_bootstrap_used >= 0.9 * BOOTSTRAP
    true_curve = truth["a"] * n ** truth["b"] + truth["c"]
    np.testing.assert_allclose(fit.predict(n), true_curve, rtol=0.02)
    # The CI brackets the estimate and has a sensible width for 2 % noise.
    low, high = fit.ci["b"]
    assert low < fit.params["b"] < high and 0.01 < high - low < 0.2


def test_power_law_in_k_recovers_known_parameters():
    truth = dict(a=0.6, b=-0.5, c=0.02)
    k = 2.0 ** np.repeat(np.arange(2, 10), 2)  # two seeds per k
    fit = fit_power_law(k, _power_law_points(**truth, x=k), variable="k", n_bootstrap=BOOTSTRAP,
                        confidence=0.99, seed=0)
    _assert_recovered(fit, truth, dict(a=0.05, b=0.03, c=0.004))
    assert fit.law == "L(k)" and fit.formula == "L(k) = a·k^b + c"


def test_joint_law_recovers_known_parameters():
    law = get_law("L(n,k)")
    n, k, _ = (a.ravel() for a in np.meshgrid(2.0 ** np.arange(10, 17), 2.0 ** np.arange(3, 8), [0, 1]))
    true_loss = law.predict(JOINT_TRUE, n, k)
    assert 0.01 < true_loss.min() and true_loss.max() < 0.3  # realistic nmse values
    fit = fit_joint_law(n, k, _noisy(true_loss), n_bootstrap=BOOTSTRAP, confidence=0.99, seed=0)
    # alpha, beta_k and gamma trade off against each other along a ridge, so their
    # estimates are looser than the n exponent and the floor's.
    _assert_recovered(fit, JOINT_TRUE, dict(alpha=0.3, beta_k=0.1, beta_n=0.06, gamma=0.015, zeta=0.4, eta=0.1))
    np.testing.assert_allclose(fit.predict(n, k), true_loss, rtol=0.03)
    assert fit.n_points == 70 and set(fit.params) == set(JOINT_TRUE)


def test_one_gross_outlier_barely_moves_the_exponent():
    n = 2.0 ** np.arange(8, 18)
    clean = _power_law_points(2.0, -0.35, 0.05, n)
    spoiled = clean.copy()
    spoiled[6] *= 3.0  # a run whose loss is three times what it should be
    b_clean = fit_power_law(n, clean, n_bootstrap=0).params["b"]
    b_robust = fit_power_law(n, spoiled, n_bootstrap=0).params["b"]
    b_plain = fit_power_law(n, spoiled, n_bootstrap=0, loss="linear").params["b"]
    assert abs(b_robust - b_clean) < 0.02
    # Plain least squares is pulled several times further: the robust loss is what helps.
    assert abs(b_plain - b_clean) > 3 * abs(b_robust - b_clean)


def test_bootstrap_is_reproducible_with_a_seed():
    n = 2.0 ** np.arange(8, 14)
    y = _power_law_points(2.0, -0.35, 0.05, n)
    first, again = (fit_power_law(n, y, n_bootstrap=50, seed=3) for _ in range(2))
    other = fit_power_law(n, y, n_bootstrap=50, seed=4)
    assert first.as_dict() == again.as_dict()
    assert first.params == other.params and first.ci != other.ci


def test_refuses_too_few_points():
    message = ("cannot fit L(n) = a·n^b + c at k=8: 3 points with 3 distinct n values; need at least 4 points "
               "with at least 3 distinct n values (add runs at more sizes, or more seeds)")
    with pytest.raises(ConfigError, match=re.escape(message)):
        fit_power_law([256, 512, 1024], [0.3, 0.2, 0.15], group="k=8")
    # Enough points but only two sizes: seeds at the same n cannot pin down three parameters.
    with pytest.raises(ConfigError, match=re.escape("4 points with 2 distinct k values; need at least 4 points "
                                                    "with at least 3 distinct k values")):
        fit_power_law([8, 8, 16, 16], [0.3, 0.31, 0.2, 0.21], variable="k", group="n=1024")
    with pytest.raises(ConfigError, match=re.escape("cannot fit L(n,k) = exp(alpha")):
        fit_joint_law([1024, 2048, 4096] * 3, [8] * 9, np.linspace(0.1, 0.2, 9))


def test_refuses_non_positive_and_nan_losses():
    n = [256, 512, 1024, 2048, 4096]
    labels = [f"n{x}-k8" for x in n]
    with pytest.raises(ConfigError, match=re.escape("log-space fitting needs positive losses; run n1024-k8 has "
                                                    "nmse=-0.01")):
        fit_power_law(n, [0.3, 0.2, -0.01, 0.1, 0.08], labels=labels, metric="nmse")
    with pytest.raises(ConfigError, match=re.escape("run n512-k8 has nmse=nan")):
        fit_power_law(n, [0.3, np.nan, 0.12, 0.1, 0.08], labels=labels, metric="nmse")
    with pytest.raises(ConfigError, match=re.escape("runs point 0 has loss=0, point 4 has loss=inf")):
        fit_power_law(n, [0.0, 0.2, 0.12, 0.1, np.inf])


# ---------------------------------------------------------------- a sweep on disk


def _row(n, k, seed, nmse, **extra):
    return {"run": f"n{n}-k{k}-s{seed}", "status": "done", "family": "topk", "n": n, "k": k, "seed": seed,
            "tokens": 1024000, "steps": 1000, "nmse": nmse, "train_nmse": 0.97 * nmse, "l0": float(k),
            "dead_fraction": round(0.02 * np.log2(n / 1024) * 8 / k, 4), "explained_variance": 1 - nmse,
            "flops": 1.2e12, "wall_time_s": 43.1, "config_hash": "3f2a9c1b0d4e", "error": None,
            "run_dir": f"runs/n{n}-k{k}-s{seed}", "point": {"sae.n": n, "sae.k": k}, **extra}


def _write_sweep(directory, extra_rows=()) -> list[dict]:
    """A 6 n x 4 k grid from the joint law with noise, one lone k=128 run, and one failed run."""
    law = get_law("L(n,k)")
    grid = [(2 ** e, k) for e in range(10, 16) for k in (8, 16, 32, 64)]
    losses = _noisy([float(law.predict(JOINT_TRUE, n, k)) for n, k in grid], seed=1)
    rows = [_row(n, k, 0, float(loss)) for (n, k), loss in zip(grid, losses, strict=True)]
    rows.append(_row(1024, 128, 0, float(law.predict(JOINT_TRUE, 1024, 128))))
    rows.append({"run": "n2048-k8-s1", "status": "failed", "n": 2048, "k": 8, "seed": 1, "nmse": None,
                 "l0": None, "dead_fraction": None, "error": "TrainingDivergedError: loss is NaN at step 312"})
    rows.extend(extra_rows)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def test_load_results_skips_failed_runs(tmp_path):
    _write_sweep(tmp_path)
    results = load_results(str(tmp_path))
    assert len(results.runs) == 25 and len(results.failed) == 1
    assert results.values("n") == [2.0 ** e for e in range(10, 16)]
    assert results.values("k") == [8.0, 16.0, 32.0, 64.0, 128.0]
    assert load_results(str(tmp_path / "results.jsonl")).runs == results.runs  # the file itself works too
    with pytest.raises(ConfigError, match=re.escape("'bogus' is not a column of")):
        results.column("bogus")
    assert group_label("n", 2.0 ** 20) == "n=1048576" and group_label("k", 8.0) == "k=8"

    # A failed run that was rerun appears again further down: its last row counts.
    _write_sweep(tmp_path, [_row(2048, 8, 1, 0.15)])
    rerun = load_results(str(tmp_path))
    assert len(rerun.runs) == 26 and not rerun.failed


def test_fit_sweep_skips_small_groups_and_refuses_bad_losses(tmp_path):
    _write_sweep(tmp_path)
    sweep_fit = fit_sweep(load_results(str(tmp_path)), n_bootstrap=0)
    assert [(f.law, f.group) for f in sweep_fit.fits] == (
        [("L(n)", f"k={k}") for k in (8, 16, 32, 64)] + [("L(k)", f"n={2 ** e}") for e in range(10, 16)]
        + [("L(n,k)", "all")])
    assert sweep_fit.notes == ["skipped L(n) at k=128: 1 point with 1 distinct n value; need at least 4 points "
                               "with at least 3 distinct n values"]
    assert np.isnan(sweep_fit.fits[0].ci["b"][0])  # no bootstrap, no interval
    assert sweep_fit.fits[0].as_dict()["ci"]["b"] == [None, None]

    _write_sweep(tmp_path, [_row(4096, 8, 7, -0.01)])
    with pytest.raises(ConfigError, match=re.escape("log-space fitting needs positive losses; run n4096-k8-s7 has "
                                                    "nmse=-0.01")):
        fit_sweep(load_results(str(tmp_path)), n_bootstrap=0)

    small = tmp_path / "small"
    small.mkdir()
    (small / "results.jsonl").write_text("".join(json.dumps(_row(n, 8, 0, 0.1 + 1 / n)) + "\n" for n in (1024, 2048)))
    with pytest.raises(ConfigError, match="no scaling law can be fitted to"):
        fit_sweep(load_results(str(small)), n_bootstrap=0)


def test_load_results_errors(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"no results.jsonl in {tmp_path}: run `saejax sweep STUDY "
                                                    f"--workdir {tmp_path}` first")):
        load_results(str(tmp_path))
    (tmp_path / "results.jsonl").write_text(json.dumps({"run": "a", "status": "failed", "error": "OOM"}) + "\n")
    with pytest.raises(DataError, match=re.escape("no finished runs in") + ".*1 failed.*OOM"):
        load_results(str(tmp_path))
    (tmp_path / "results.jsonl").write_text('{"run": "a", "n": 1024, "k": 8, "nmse": 0.1}\n{"run": "b", "n"\n')
    with pytest.raises(DataError, match="line 2 of .* is not valid JSON"):
        load_results(str(tmp_path))


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE and os.path.getsize(path) > 1024


def test_saejax_fit_end_to_end(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _write_sweep(sweep)
    assert cli_main(["fit", str(sweep), "--bootstrap", str(BOOTSTRAP), "--seed", "0"]) == 0
    stdout = capsys.readouterr().out
    assert "note: skipped 1 failed run (n2048-k8-s1)" in stdout
    assert "note: skipped L(n) at k=128: 1 point with 1 distinct n value" in stdout
    assert re.search(r"law\s+group\s+parameter\s+estimate\s+CI low\s+CI high\s+points", stdout)

    out = sweep / "fit"
    report = json.loads((out / "fit.json").read_text())
    assert report["metric"] == "nmse" and report["runs"] == 25 and report["failed_runs_skipped"] == 1
    fits = {(f["law"], f["group"]): f for f in report["fits"]}
    assert len(fits) == 11

    # The CLI's numbers are the library's, resample for resample.
    results = load_results(str(sweep))
    at_k8 = results.select(k=8)
    direct = fit_power_law(at_k8.column("n"), at_k8.column("nmse"), n_bootstrap=BOOTSTRAP, seed=0)
    assert fits[("L(n)", "k=8")]["params"] == direct.params
    assert fits[("L(n)", "k=8")]["ci"] == {name: list(ci) for name, ci in direct.ci.items()}
    joint = fit_joint_law(results.column("n"), results.column("k"), results.column("nmse"),
                          n_bootstrap=BOOTSTRAP, seed=0)
    assert fits[("L(n,k)", "all")]["params"] == joint.params

    # Every parameter of every fit is in the printed table, as printed.
    for fit in report["fits"]:
        for name, value in fit["params"].items():
            assert re.search(rf"{re.escape(fit['law'])}\s+{re.escape(fit['group'])}\s+{name}\s+{value:.4g}\s", stdout)
    assert f"{direct.params['b']:.4g}" in (out / "fit.md").read_text()
    assert "| L(n) | k=8 | b |" in (out / "fit.md").read_text()
    for name in ("loss_vs_n.png", "loss_vs_k.png", "frontier.png", "dead_vs_n.png"):
        assert _is_png(out / name), name
        assert str(out / name) in stdout
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_saejax_fit_options_and_errors(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _write_sweep(sweep)
    out = tmp_path / "elsewhere"
    assert cli_main(["fit", str(sweep / "results.jsonl"), "--metric", "train_nmse", "--out", str(out),
                     "--bootstrap", "0"]) == 0
    assert json.loads((out / "fit.json").read_text())["metric"] == "train_nmse"
    assert not (sweep / "fit").exists()
    capsys.readouterr()

    # Several metrics, e.g. the evaluation's downstream loss and probe loss against n: one fit each.
    rows = [_row(n, 8, 0, 0.2 + 1 / n, ce_delta=0.05 + 40.0 * n**-0.6, probe_loss=0.3 + 3.0 * n**-0.4)
            for n in (2**e for e in range(8, 14))]
    (tmp_path / "eval_sweep").mkdir()
    (tmp_path / "eval_sweep" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["fit", str(tmp_path / "eval_sweep"), "--metric", "ce_delta,probe_loss", "--bootstrap", "0"]) == 0
    for metric, exponent in (("ce_delta", -0.6), ("probe_loss", -0.4)):
        fit = json.loads((tmp_path / "eval_sweep" / "fit" / metric / "fit.json").read_text())
        assert fit["metric"] == metric
        law = next(f for f in fit["fits"] if f["law"] == "L(n)")
        assert law["params"]["b"] == pytest.approx(exponent, abs=1e-3)
    assert "== probe_loss ==" in capsys.readouterr().out

    missing = tmp_path / "nothing"
    assert cli_main(["fit", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (f"saejax fit: error: no results.jsonl in {missing}: "
                                               f"run `saejax sweep STUDY --workdir {missing}` first")
    assert cli_main(["fit", str(sweep), "--metric", "bogus"]) == 2
    assert "'bogus' is not a column of" in capsys.readouterr().err
    assert cli_main(["fit", str(sweep), "--confidence", "95"]) == 2
    assert "--confidence must be between 0 and 1" in capsys.readouterr().err


def test_plot_functions_draw_on_given_axes(tmp_path):
    from matplotlib.figure import Figure

    _write_sweep(tmp_path)
    results = load_results(str(tmp_path))
    sweep_fit = fit_sweep(results, n_bootstrap=0)
    figure = Figure()
    axes = figure.subplots(1, 3)
    assert plot_loss_vs_n(results, sweep_fit, ax=axes[0]) is figure
    assert plot_frontier(results, ax=axes[1]) is figure
    assert plot_dead_vs_n(results, ax=axes[2]) is figure
    # One fitted curve per k with a fit, plus the mean markers of every k.
    assert len(axes[0].get_lines()) == 4 + 5
    assert axes[0].get_xscale() == "log" and axes[0].get_yscale() == "log"
    assert "k=8" in format_table(sweep_fit.fits)


def test_command_module_imports_no_scipy_or_matplotlib():
    """The CLI imports saejax.scaling.command to build every parser; that must stay cheap."""
    code = ("import sys, saejax.scaling.command; "
            "print(sorted(m for m in ('scipy', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- the notebook


def test_notebook_runs_clean_and_draws(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = os.path.join(REPO, "experiments", "scaling_laws.ipynb")
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "save the notebook without outputs"
    assert 'SWEEP_DIR = os.environ.get("SAEJAX_SWEEP_DIR", "../runs/minilm_sweep")' in code[0].source

    _write_sweep(tmp_path)
    monkeypatch.setenv("SAEJAX_SWEEP_DIR", str(tmp_path))
    monkeypatch.setenv("SAEJAX_BOOTSTRAP", "50")
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(REPO, "experiments")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "finished runs: 25; failed runs (skipped): 1" in text
    assert re.search(r"L\(n\)\s+k=8\s+b\s+-0\.\d+", text)

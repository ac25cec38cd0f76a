"""Sweeps over several families: the fit picks one family, the frontier compares them all."""

import json
import math

import numpy as np
import pytest

from saejax import cli
from saejax.errors import ConfigError
from saejax.scaling.frontier import compare_at, format_markdown, frontier_points
from saejax.scaling.sweep_fit import fit_sweep
from saejax.scaling.table import load_results


def _row(run, family, n, l0, nmse, k=None, control="k", value=None, dead=0.0, dense=0.0):
    return {"run": run, "status": "done", "family": family, "n": n, "k": k, "sparsity_control": control,
            "sparsity_value": k if value is None else value, "l0": l0, "nmse": nmse,
            "dead_fraction": dead, "dense_fraction": dense}


@pytest.fixture
def sweep(tmp_path):
    rows = [_row("t8", "topk", 1024, 8.0, 0.30, k=8), _row("t32", "topk", 1024, 32.0, 0.12, k=32),
            _row("r1", "relu", 1024, 6.0, 0.40, control="l1_coef", value=0.1, dense=0.01),
            _row("r2", "relu", 1024, 24.0, 0.18, control="l1_coef", value=0.01, dead=0.05),
            _row("r3", "relu", 1024, 60.0, 0.10, control="l1_coef", value=0.001)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_fitting_a_sweep_of_several_families_needs_one_chosen(sweep):
    with pytest.raises(ConfigError, match=r"holds runs of several families \(relu, topk\); scaling laws are "
                                          r"fitted to one family at a time: pass --family NAME"):
        load_results(str(sweep))
    with pytest.raises(ConfigError, match=r"no runs of family 'gated' in .*; its families: relu, topk"):
        load_results(str(sweep), family="gated")
    topk = load_results(str(sweep), family="topk")
    assert [r["run"] for r in topk.runs] == ["t8", "t32"] and topk.notes == ()


def test_a_family_without_k_is_placed_at_its_measured_l0_and_the_fit_says_so(sweep):
    relu = load_results(str(sweep), family="relu")
    assert list(relu.column("k")) == [6.0, 24.0, 60.0]
    note = "3 run(s) of family 'relu', which declares no k, are placed on the k axis at their measured L0"
    assert relu.notes == (note,)
    # L(k) at n=1024 needs 4 points: skipped, and the note leads the fit's notes.
    with pytest.raises(ConfigError, match="no scaling law can be fitted"):
        fit_sweep(relu, n_bootstrap=0)


def test_frontier_points_table_and_interpolation(sweep):
    points = frontier_points(load_results(str(sweep), all_families=True))
    assert list(points) == ["relu", "topk"]
    assert [p["l0"] for p in points["relu"]] == [6.0, 24.0, 60.0]
    assert points["relu"][0]["sparsity"] == "l1_coef=0.1" and points["topk"][1]["sparsity"] == "k=32"
    compared = compare_at(points, 16.0)
    # log-log interpolation written out: topk between (8, 0.30) and (32, 0.12), relu between (6, .4) and (24, .18)
    t = math.log(16 / 8) / math.log(32 / 8)
    assert compared["topk"] == pytest.approx(math.exp((1 - t) * math.log(0.30) + t * math.log(0.12)))
    r = math.log(16 / 6) / math.log(24 / 6)
    assert compared["relu"] == pytest.approx(math.exp((1 - r) * math.log(0.40) + r * math.log(0.18)))
    assert math.isnan(compare_at(points, 64.0)["topk"])  # outside the runs: not extrapolated
    table = format_markdown(points)
    assert "| relu | l1_coef=0.01 | 0.1800 | 24.0 | 5.0 | 0.0 | r2 |" in table
    assert "| relu | l1_coef=0.1 | 0.4000 | 6.0 | 0.0 | 1.0 | r1 |" in table


def test_frontier_command_writes_plot_table_and_json(sweep, capsys):
    out = sweep / "out"
    assert cli.main(["frontier", str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "family" in printed and "l1_coef=0.001" in printed
    assert (out / "frontier.png").stat().st_size > 10_000
    saved = json.loads((out / "frontier.json").read_text())
    assert [p["run"] for p in saved["families"]["topk"]] == ["t8", "t32"]
    np.testing.assert_allclose([p["nmse"] for p in saved["families"]["relu"]], [0.40, 0.18, 0.10])
    assert (out / "frontier.md").read_text() == format_markdown(frontier_points(
        load_results(str(sweep), all_families=True)))

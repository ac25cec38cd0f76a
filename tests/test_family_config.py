"""Families own their config groups: schema, checks, identity and sweeps across the registry."""

import json
import os

import pytest

from helpers import small_config
from saejax import cli
from saejax.config import GENERIC_SAE_KEYS, REPORTING_KEYS, active_tree, base_config, load_config, set_value, validate
from saejax.errors import ConfigError
from saejax.models import FAMILIES
from saejax.sweep.study import load_study, specs

NAMES = sorted(FAMILIES)


def test_base_config_has_one_group_per_family_and_nothing_else_under_sae():
    sae = base_config().sae
    groups = sorted(key for key in sae if key not in GENERIC_SAE_KEYS)
    assert groups == NAMES
    for name in NAMES:
        assert sae[name].to_dict() == FAMILIES[name].defaults().to_dict()


@pytest.mark.parametrize("name", NAMES)
def test_every_family_validates_from_its_defaults_and_its_identity_holds_only_its_keys(name):
    config = load_config("default", [("sae.family", name)])
    assert validate(config, 1) == (1, 1)
    tree = active_tree(config)
    reporting = {key.split(".")[1] for key in REPORTING_KEYS}
    expected = (set(GENERIC_SAE_KEYS) - reporting) | set(FAMILIES[name].defaults())
    expected |= set(FAMILIES[name].inner_families(config.sae[name]))  # a wrapper's inner family's group
    expected -= set(FAMILIES[name].unhashed_defaults())  # keys added later, left out at their defaults
    assert set(tree["sae"]) == expected, "no other family's keys in the run's identity"
    assert "synthetic" in tree["data"]  # the active source's group stays


def test_a_store_run_has_no_synthetic_group_in_its_identity():
    config = small_config(**{"data.source": "store", "data.path": "/some/store"})
    assert "synthetic" not in active_tree(config)["data"]


def test_a_key_of_another_family_is_refused():
    topk_keys = set(FAMILIES["topk"].defaults())
    other = next(name for name in NAMES if name != "topk" and set(FAMILIES[name].defaults()) - topk_keys)
    key, default = next((k, v) for k, v in FAMILIES[other].defaults().items() if k not in topk_keys)
    changed = (default or 0) + 1 if isinstance(default, (int, float)) and not isinstance(default, bool) else not default
    config = small_config(**{f"sae.{other}.{key}": changed})
    with pytest.raises(ConfigError, match=rf"config key 'sae\.{other}\.{key}' is set \({changed!r}\) but belongs to "
                                          rf"family '{other}', and sae\.family='topk'; set sae\.family={other} "
                                          "or remove the key"):
        validate(config, 1)
    config = base_config()
    with pytest.raises(ConfigError, match=rf"config key 'sae\.{key}' belongs to family '{other}' "
                                          rf"\(sae\.{other}\.{key}\), but sae\.family='topk'"):
        set_value(config, f"sae.{key}", str(changed))


def test_an_unknown_family_lists_the_families():
    with pytest.raises(ConfigError, match=r"sae\.family='relu_l1' is not a family; the families are: "
                                          + ", ".join(NAMES)):
        validate(small_config(**{"sae.family": "relu_l1"}), 1)


def test_switching_family_resets_what_the_config_file_set_for_the_previous_one():
    config = load_config("default", [("sae.family", NAMES[0] if NAMES[0] != "topk" else NAMES[1])])
    assert config.sae.topk.to_dict() == FAMILIES["topk"].defaults().to_dict()


STUDY = '''
from saejax.config import base_config

def get_config():
    c = base_config()
    c.sae.d = 16
    c.sae.n = 64
    c.sae.init_sample_rows = 256
    c.data.batch_size = 32
    c.data.synthetic.num_features = 32
    c.data.synthetic.avg_active = 3.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 1
    c.train.steps = 4
    c.train.eval_batches = 1
    c.train.progress = False
    c.checkpoint.async_save = False
    c.mesh.model = 1
    return c

def get_hyper(h):
    return h.chainit([
        h.product([h.fixed("sae.family", "topk"), h.sweep("sae.k", [4, 8])]),
        h.product([h.fixed("sae.family", "{other}"), h.fixed("sae.{key}", {value})]),
    ])
'''


def test_a_sweep_over_two_families_reads_its_rows_from_results_and_compares_them(tmp_path, capsys):
    other = next(name for name in NAMES if not FAMILIES[name].has_k)
    key = FAMILIES[other].sparsity_key
    value = FAMILIES[other].defaults()[key]
    path = tmp_path / "two_families.py"
    path.write_text(STUDY.format(other=other, key=key, value=repr(value)))
    workdir = tmp_path / "sweep"
    grid = specs(load_study(str(path)), str(workdir))
    assert [s.config.sae.family for s in grid] == ["topk", "topk", other]
    assert cli.main(["sweep", str(path), "--workdir", str(workdir)]) == 0
    rows = [json.loads(line) for line in open(workdir / "results.jsonl")]
    assert [r["family"] for r in rows] == ["topk", "topk", other]
    assert [r["k"] for r in rows] == [4, 8, None]
    assert [r["sparsity_control"] for r in rows] == ["k", "k", key] and rows[2]["sparsity_value"] == value
    for row in rows:
        results = json.load(open(os.path.join(workdir, row["run_dir"], "results.json")))
        assert row["l0"] == results["l0"] == results["eval_metrics"]["l0"]
        assert row["dense_fraction"] == results["eval_metrics"]["dense_fraction"]
    capsys.readouterr()
    assert cli.main(["fit", str(workdir)]) == 2  # several families: one must be chosen
    assert "pass --family NAME" in capsys.readouterr().err
    assert cli.main(["frontier", str(workdir)]) == 0
    assert (workdir / "frontier" / "frontier.png").exists()

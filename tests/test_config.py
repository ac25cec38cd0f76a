"""Config loading, overrides, validation, and the CLI refusing bad input before compiling."""

import textwrap

import pytest

from helpers import run_cli, small_config
from saejax import cli
from saejax.config import base_config, builtin_configs, load_config, validate
from saejax.errors import EXIT_USAGE, ConfigError


def _write_config(tmp_path, body, name="my_config.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# ---------------------------------------------------------------------------- load_config


def test_builtin_default_loads_locked_with_its_values():
    config = load_config("default")
    assert (config.sae.d, config.sae.n, config.sae.topk.k) == (64, 1024, 8)
    assert config.data.batch_size == 1024
    assert config.optim.lr == 1e-3
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.sae.not_a_key = 1  # locked: a new key cannot be added after loading


def test_builtin_names_are_listed():
    assert {"default", "npy", "gpt2_small", "plan_16m"} <= set(builtin_configs())


def test_variant_short_aliases_and_dotted_keys():
    config = load_config("default:n=2048,k=4")
    assert (config.sae.n, config.sae.topk.k) == (2048, 4)
    assert config.sae.d == 64  # untouched

    config = load_config(
        "default:d=32, n=512 ,k=2,family=topk,steps=7,batch=256,lr=0.01,seed=3,data=2,model=4,"
        "path=/x.npy,sae.auxk_coef=0,data.normalize=false"
    )
    assert (config.sae.d, config.sae.n, config.sae.topk.k, config.sae.family) == (32, 512, 2, "topk")
    assert config.train.steps == 7
    assert config.data.batch_size == 256
    assert config.optim.lr == 0.01 and isinstance(config.optim.lr, float)
    assert config.seed == 3
    assert (config.mesh.data, config.mesh.model) == (2, 4)
    assert config.data.path == "/x.npy"
    assert config.sae.topk.auxk_coef == 0.0
    assert config.data.normalize is False


def test_overrides_are_converted_to_the_key_type_and_win_over_the_variant():
    config = load_config(
        "default:k=4",
        [("sae.k", "6"), ("optim.lr", "3e-4"), ("data.normalize", "no"), ("train.steps", "1e3"), ("sae.family", "topk")],
    )
    assert config.sae.topk.k == 6 and isinstance(config.sae.topk.k, int)
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.data.normalize is False
    assert config.train.steps == 1000 and isinstance(config.train.steps, int)


def test_config_file_path_with_variant(tmp_path):
    path = _write_config(tmp_path, """
        from saejax.config import apply_variant, base_config

        def get_config(arg=None):
            c = base_config()
            c.sae.n = 4096
            c.sae.k = 32
            return apply_variant(c, arg)
    """)
    config = load_config(path)
    assert (config.sae.n, config.sae.topk.k) == (4096, 32)
    config = load_config(path + ":k=16", [("sae.d", "128")])
    assert (config.sae.n, config.sae.topk.k, config.sae.d) == (4096, 16, 128)
    assert validate(config, 1) == (1, 1)


def test_config_file_without_argument_rejects_a_variant(tmp_path):
    path = _write_config(tmp_path, """
        from saejax.config import base_config

        def get_config():
            return base_config()
    """)
    assert load_config(path).sae.topk.k == 16
    with pytest.raises(ConfigError, match=r"takes no variant, but 'k=4' was given"):
        load_config(path + ":k=4")


def test_unknown_override_key_names_it_and_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown config key 'sae\.kk'\. Did you mean 'k' \(sae\.topk\.k\)\?") as info:
        load_config("default", [("sae.kk", "3")])
    assert "Known keys here: batchtopk, binary, d, dead_tokens, dense_threshold, family," in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'sea'\. Did you mean 'sae'\?"):
        load_config("default", [("sea.k", "3")])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rate'"):
        load_config("default", [("optim.learning_rate", "0.1")])


def test_unknown_variant_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'kk'"):
        load_config("default:kk=3")
    with pytest.raises(ConfigError, match=r"config variant 'n' is not key=value"):
        load_config("default:n")


def test_group_key_cannot_be_set_to_a_value():
    with pytest.raises(ConfigError, match=r"'sae' is a group of keys"):
        load_config("default", [("sae", "3")])


def test_config_file_adding_an_unknown_key_is_an_error(tmp_path):
    # base_config() is unlocked while get_config() runs, so a misspelt key in a
    # file is accepted by ml_collections; the schema check must reject it
    # before anything uses the config.
    path = _write_config(tmp_path, """
        from saejax.config import base_config

        def get_config():
            c = base_config()
            c.sae.kk = 5
            return c
    """)
    with pytest.raises(ConfigError, match=r"unknown config key 'sae\.kk'\. Did you mean 'k' \(sae\.topk\.k\)\?"):
        validate(load_config(path), 1)


def test_config_file_missing_keys_is_an_error(tmp_path):
    path = _write_config(tmp_path, """
        import ml_collections

        def get_config():
            return ml_collections.ConfigDict({"seed": 0})
    """)
    with pytest.raises(ConfigError, match=r"config group 'root' lacks keys .*'sae'.*start config files from saejax\.config\.base_config\(\)"):
        validate(load_config(path), 1)


def test_config_file_with_a_wrongly_typed_value_is_a_config_error(tmp_path):
    path = _write_config(tmp_path, """
        from saejax.config import base_config

        def get_config():
            c = base_config()
            c.sae.k = "abc"
            return c
    """)
    # `c.sae.k` is TopK's k in the layout before family groups: moved there, then type-checked.
    with pytest.raises(ConfigError, match=r"config key 'sae\.topk\.k' expects int, got 'abc'"):
        load_config(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("sae.k", "abc", r"config key 'sae\.topk\.k' expects int, got 'abc'"),
        ("sae.topk.k", "2.5", r"config key 'sae\.topk\.k' expects int, got '2\.5'"),
        ("data.normalize", "maybe", r"config key 'data\.normalize' expects bool, got 'maybe': use true or false"),
        ("optim.lr", "fast", r"config key 'optim\.lr' expects float, got 'fast'"),
    ],
)
def test_wrong_type(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [(key, value)])


def test_missing_config_file_lists_builtins(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match=r"config file '.*nope\.py' not found; .*built-in configs: default, gpt2_small, minilm, npy, plan_16m"):
        load_config(missing)
    with pytest.raises(ConfigError, match=r"config file 'defualt' not found"):
        load_config("defualt:n=8")


def test_config_file_without_get_config(tmp_path):
    path = _write_config(tmp_path, "x = 1\n")
    with pytest.raises(ConfigError, match=r"config file .*my_config\.py has no get_config\(\) function"):
        load_config(path)


def test_config_file_that_fails_to_import_or_returns_a_dict(tmp_path):
    broken = _write_config(tmp_path, "import not_a_module_xyz\n", name="broken.py")
    with pytest.raises(ConfigError, match=r"broken\.py failed to load: ModuleNotFoundError"):
        load_config(broken)
    plain = _write_config(tmp_path, "def get_config():\n    return {'seed': 0}\n", name="plain.py")
    with pytest.raises(ConfigError, match=r"get_config\(\) in .*plain\.py returned dict, not a ConfigDict"):
        load_config(plain)


# ---------------------------------------------------------------------------- validate


def test_valid_config_returns_the_mesh_shape():
    assert validate(small_config(), 8) == (1, 1)
    assert validate(small_config(**{"mesh.data": 2, "mesh.model": 2}), 8) == (2, 2)  # fewer devices is fine
    assert validate(small_config(**{"mesh.data": -1, "mesh.model": 2}), 8) == (4, 2)
    assert validate(small_config(**{"mesh.data": 2, "mesh.model": -1}), 8) == (2, 4)
    assert validate(small_config(**{"mesh.data": 1, "mesh.model": -1}), 8) == (1, 8)
    assert validate(small_config(**{"mesh.data": -1, "mesh.model": 1}), 8) == (8, 1)
    assert validate(load_config("default"), 8) == (1, 8)
    assert validate(load_config("default"), 1) == (1, 1)


@pytest.mark.parametrize(
    "overrides, num_devices, message",
    [
        ({"sae.k": 300}, 1, r"sae\.topk\.k=300 must be between 1 and sae\.n=256"),
        ({"sae.topk.k": 0}, 1, r"sae\.topk\.k=0 must be between 1 and sae\.n=256"),
        ({"sae.n": 100, "sae.k": 4, "mesh.model": 8}, 8,
         r"sae\.n=100 is not divisible by the model axis \(8 devices\); choose n as a multiple of 8 or change mesh\.model"),
        ({"data.batch_size": 100, "mesh.data": 8}, 8,
         r"data\.batch_size=100 is not divisible by the data axis \(8 devices\); choose a multiple of 8 or change mesh\.data"),
        ({"mesh.data": 4, "mesh.model": 4}, 8, r"mesh data=4 x model=4 needs 16 devices, but only 8 are available"),
        ({"mesh.model": 2}, 1, r"mesh data=1 x model=2 needs 2 devices, but only 1 are available"),
        ({"mesh.data": -1, "mesh.model": -1}, 8, r"mesh\.data and mesh\.model cannot both be -1"),
        ({"mesh.data": -1, "mesh.model": 3}, 8, r"mesh\.model=3 does not divide the 8 available devices"),
        ({"mesh.data": 0, "mesh.model": 1}, 8, r"mesh sizes must be positive \(or -1\), got data=0, model=1"),
        ({"optim.lr": -1e-3}, 1, r"optim\.lr=-0\.001 must be a positive number"),
        ({"optim.lr": float("nan")}, 1, r"optim\.lr=nan must be a positive number"),
        ({"sae.family": "relu_l1_typo"}, 1, r"sae\.family='relu_l1_typo' is not a family; the families are: .*topk"),
        ({"data.source": "npy"}, 1, r"data\.source='npy' needs data\.path=/path/to/activations\.npy"),
        ({"data.source": "parquet"}, 1, r"data\.source='parquet' is not one of \['npy', 'store', 'synthetic'\]"),
        ({"train.compute_dtype": "float16"}, 1, r"train\.compute_dtype='float16' is not one of \('float32', 'bfloat16'\)"),
        ({"train.topk_impl": "fast"}, 1, r"train\.topk_impl='fast' is not one of"),
        ({"data.eval_fraction": 1.0}, 1, r"data\.eval_fraction=1\.0 must be in \[0, 1\)"),
        ({"data.synthetic.avg_active": 100.0}, 1, r"data\.synthetic\.avg_active=100\.0 must be in \(0, num_features\]"),
        ({"optim.ema_decay": 1.0}, 1, r"optim\.ema_decay=1\.0 must be in \[0, 1\)"),
        ({"train.steps": 0}, 1, r"train\.steps=0 must be >= 1"),
    ],
)
def test_validate_rejects_impossible_values(overrides, num_devices, message):
    with pytest.raises(ConfigError, match=message):
        validate(small_config(**overrides), num_devices)


def test_base_config_is_valid_on_one_device():
    assert validate(base_config(), 1) == (1, 1)


# ---------------------------------------------------------------------------- CLI


def _assert_rejected(result, workdir, message):
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "saejax train: error:" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "checkpoints").exists()
    assert not workdir.exists()  # nothing is written before the config is checked


# run_cli drops XLA_FLAGS after merging `env` (so --xla_force_host_platform_device_count
# cannot be passed through it); JAX reads the jax_num_cpu_devices flag from this variable.
EIGHT_DEVICES = {"JAX_NUM_CPU_DEVICES": "8"}


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--config.sae.kk=5"], None, "unknown config key 'sae.kk'. Did you mean 'k' (sae.topk.k)?"),
        (["--config.data.normalize", "maybe"], None, "config key 'data.normalize' expects bool, got 'maybe': use true or false"),
        (["--config", "default:k=4", "--config.sae.topk.k=5000"], None, "sae.topk.k=5000 must be between 1 and sae.n=1024"),
        # One CPU device in the subprocess: a 3-way model axis cannot even be built.
        (["--config.mesh.model=3"], None, "mesh data=1 x model=3 needs 3 devices, but only 1 are available"),
        # Eight devices: the mesh fits, but n=1024 does not split three ways.
        (["--config.mesh.model=3"], EIGHT_DEVICES, "sae.n=1024 is not divisible by the model axis (3 devices)"),
        (["--config.mesh.data=8", "--config.mesh.model=1", "--config.data.batch_size=1001"], EIGHT_DEVICES,
         "data.batch_size=1001 is not divisible by the data axis (8 devices)"),
    ],
    ids=["unknown-key", "wrong-type", "k-over-n", "mesh-too-big", "n-vs-model-axis", "batch-vs-data-axis"],
)
def test_cli_rejects_bad_config_before_compiling(tmp_path, args, env, message):
    workdir = tmp_path / "w"
    result = run_cli("train", "--workdir", str(workdir), *args, env=env, timeout=120)
    _assert_rejected(result, workdir, message)


def test_cli_rejects_config_file_with_unknown_key(tmp_path, capsys):
    path = _write_config(tmp_path, """
        from saejax.config import base_config

        def get_config():
            c = base_config()
            c.train.stpes = 10
            return c
    """)
    workdir = tmp_path / "w"
    assert cli.main(["train", "--config", path, "--workdir", str(workdir)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "saejax train: error: unknown config key 'train.stpes'. Did you mean 'steps'?" in err
    assert not workdir.exists()


def test_cli_unrecognised_argument_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--workdir", str(tmp_path / "w"), "--bogus"])
    assert info.value.code == 2
    assert "error: unrecognised argument '--bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--workdir", str(tmp_path / "w"), "--config.sae.topk.k"])
    assert info.value.code == 2
    assert "--config.sae.topk.k needs a value: --config.sae.topk.k=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["train"])  # --workdir is required
    assert info.value.code == 2
    assert not (tmp_path / "w").exists()


def test_cli_unrecognised_argument_in_a_subprocess(tmp_path):
    result = run_cli("train", "--workdir", str(tmp_path / "w"), "--bogus", timeout=60)
    assert result.returncode == 2
    assert "error: unrecognised argument '--bogus'" in result.stderr
    assert not (tmp_path / "w").exists()

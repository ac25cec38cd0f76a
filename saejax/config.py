"""Every config key saejax knows, its default, and the checks run before compiling.

Config files (`saejax/configs/*.py`) start from `base_config()` and change
values; the result is locked, so a misspelt key is an error, not a silently
ignored setting. `validate()` then checks types and values against the
device count, before anything is compiled or allocated.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import math
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from saejax.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16")
TOPK_IMPLS = ("auto", "lax", "grouped")
BUILTIN_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


# Keys directly under `sae` that every family has; the rest of `sae` is one group per family.
GENERIC_SAE_KEYS = ("family", "d", "n", "dead_tokens", "fire_threshold", "dense_threshold", "init_sample_rows")
# Keys that change how a run reports, not what it trains: outside its identity and sweep hash.
REPORTING_KEYS = ("sae.dense_threshold",)
REPORTING_GROUPS = ("eval",)  # evaluation settings: a run evaluated otherwise is the same run


def base_config() -> ml_collections.ConfigDict:
    """All keys with their defaults. Laptop-sized; config files scale it.

    `sae.<family>` holds each registered family's own keys (saejax.models.FAMILIES);
    only the group of `sae.family` is used by a run.
    """
    from saejax.algorithms import ALGORITHMS
    from saejax.models import FAMILIES

    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and data order

    c.sae = ml_collections.ConfigDict()
    c.sae.family = "topk"  # see saejax.models.FAMILIES
    c.sae.d = 64  # input (activation) dimension
    c.sae.n = 1024  # number of latents
    c.sae.dead_tokens = 10_000_000  # a latent is dead after this many tokens without firing
    c.sae.fire_threshold = 0.0  # fired means value > threshold (OpenAI's reference uses 1e-3)
    c.sae.dense_threshold = 0.1  # a latent is dense if it fires on more than this fraction of tokens
    c.sae.init_sample_rows = 32768  # rows for the geometric-median b_pre and the data scale
    for name, family in FAMILIES.items():
        c.sae[name] = family.defaults()

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = config_dict.placeholder(float)  # default: the family's (2e-4 / sqrt(n / 2^14) for TopK)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 6.25e-10
    c.optim.warmup_steps = 100  # linear warm-up, then constant
    c.optim.ema_decay = 0.0  # > 0 keeps an EMA of the weights (Gao et al.: 0.999), exported

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic | npy | store (see saejax.data.SOURCES)
    c.data.path = ""  # npy: a .npy file (tokens, d); store: a directory written by `saejax harvest`
    c.data.batch_size = 4096  # global batch in tokens
    c.data.normalize = True  # scale inputs so that E||x||^2 = d (scale stored with results)
    c.data.eval_fraction = 0.01  # held out for evaluation (npy: rows; store: chunks)
    c.data.prefetch = 2  # batches prepared ahead of the step (and as many more being read)
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_features = 512  # true dictionary size
    c.data.synthetic.avg_active = 8.0  # expected true features per token
    c.data.synthetic.power_law_exponent = 0.5  # feature i fires with probability ~ (i+1)^-exponent
    c.data.synthetic.min_magnitude = 0.5  # active coefficients ~ U[min, max]
    c.data.synthetic.max_magnitude = 1.5
    c.data.synthetic.noise_std = 0.01  # isotropic Gaussian noise per coordinate
    c.data.synthetic.dictionary_seed = 1234  # the true dictionary; separate from the data order

    c.train = ml_collections.ConfigDict()
    c.train.algorithm = "adam"  # see saejax.algorithms.ALGORITHMS
    c.train.steps = 1000
    c.train.log_every = 10  # steps between metric rows in metrics.jsonl
    c.train.eval_batches = 4  # held-out batches evaluated at the end
    c.train.compute_dtype = "float32"  # matmul inputs; bfloat16 on accelerators, loss stays float32
    c.train.topk_impl = "auto"  # one of TOPK_IMPLS
    c.train.progress = True  # progress bar on stderr
    for name, algorithm in ALGORITHMS.items():  # `train.<algorithm>`: keys of algorithms that own some
        if algorithm.defaults() is not None:
            c.train[name] = algorithm.defaults()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # 0 disables periodic saves (a final one is still written)
    c.checkpoint.keep_last = 3
    c.checkpoint.keep_every = 0  # also keep every checkpoint whose step is a multiple of this
    c.checkpoint.async_save = True

    c.eval = _eval_group()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # data-parallel groups (-1: all devices not used by model)
    c.mesh.model = -1  # devices the dictionary is split over (-1: the rest)

    c.device_memory_gb = 0.0  # per-device budget checked by the plan; 0 = no check
    return c


# ---------------------------------------------------------------------------- variants

_VARIANT_ALIASES = {
    "d": "sae.d",
    "n": "sae.n",
    "k": "sae.k",  # the active family's k (sae.<family>.k), see set_value
    "family": "sae.family",
    "steps": "train.steps",
    "batch": "data.batch_size",
    "lr": "optim.lr",
    "seed": "seed",
    "data": "mesh.data",
    "model": "mesh.model",
    "path": "data.path",
}


def _eval_group() -> ml_collections.ConfigDict:
    """`eval.*`: what `saejax eval` (and the end of every run) computes; see saejax.evaluation."""
    from saejax.evaluation import EVALUATORS

    group = ml_collections.ConfigDict()
    group.at_end = True  # evaluate when training finishes (single-process runs; else run `saejax eval`)
    group.model = ""  # the LM to run; empty: the model the store was harvested from
    group.device = "cpu"  # torch device of the LM: cpu, cuda, cuda:1, ...
    group.contexts = 64  # held-out contexts (the store's text after what it harvested)
    group.batch_contexts = 8  # contexts per LM forward pass
    group.progress = True  # progress bars on stderr
    for name, evaluator in EVALUATORS.items():
        group[name] = ml_collections.ConfigDict({"enabled": True, **evaluator.defaults()})
    return group


def apply_variant(config: ml_collections.ConfigDict, arg: str | None, aliases: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """Apply `get_config(arg)` variants such as "n=16384,k=32" or "sae.auxk_coef=0".

    Short names: d, n, k, family, steps, batch, lr, seed, data, model, path;
    any dotted key also works. Values are converted to the key's type.
    """
    if not arg:
        return config
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"config variant {item!r} is not key=value (e.g. 'n=16384,k=32')")
        key, value = (s.strip() for s in item.split("=", 1))
        set_value(config, (_VARIANT_ALIASES if aliases is None else aliases).get(key, key), value)
    return config


def _lookup(config, dotted: str):
    *parents, leaf = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(_unknown_key_message(".".join(parents[: i + 1]), node))
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            prefix = ".".join(parents[: i + 1])
            raise ConfigError(f"unknown config key {dotted!r}: {prefix!r} is a value, not a group of keys")
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(_unknown_key_message(dotted, node))
    return node, leaf


def family_key(config, dotted: str) -> str:
    """`sae.KEY` for a key of the active family's group -> `sae.<family>.KEY`; other keys unchanged.

    The short form is what configs used before families owned their keys, and
    what researchers type (`--config.sae.k=32`); it resolves against the family
    set so far, so set `sae.family` first.
    """
    parts = dotted.split(".")
    if len(parts) == 2 and parts[0] == "sae" and parts[1] not in config.sae:
        family = config.sae.family
        group = config.sae.get(family)
        if isinstance(group, ml_collections.ConfigDict) and parts[1] in group:
            return f"sae.{family}.{parts[1]}"
        owners = [name for name in _family_names() if parts[1] in config.sae.get(name, {})]
        if owners:
            raise ConfigError(f"config key {dotted!r} belongs to family {owners[0]!r} (sae.{owners[0]}.{parts[1]}), "
                              f"but sae.family={family!r}; set sae.family={owners[0]} first, "
                              f"or use the keys of {family!r}: {', '.join(sorted(group.keys()))}")
    return dotted


def _family_names() -> list[str]:
    from saejax.models import FAMILIES

    return sorted(FAMILIES)


def set_value(config, dotted: str, value: Any) -> None:
    """Set a dotted key from a string or value, converting to the key's declared type."""
    dotted = family_key(config, dotted)
    node, leaf = _lookup(config, dotted)
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"config key {dotted!r} is a group of keys ({', '.join(sorted(node[leaf].keys()))}); set one of them")
    field_type = node.get_type(leaf)
    try:
        converted = _convert(value, field_type) if isinstance(value, str) else value
        if dotted == "sae.family":
            _leave_family(config, converted)
        with node.unlocked():
            node[leaf] = converted
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key {dotted!r} expects {field_type.__name__}, got {value!r}: {e}") from None


def _leave_family(config, new_family: str) -> None:
    """Switching sae.family resets the old family's group: what a config file set for TopK
    (e.g. the default's k) does not apply to a ReLU run, and would be refused by validate()."""
    from saejax.models import FAMILIES

    old = config.sae.family
    if new_family != old and old in FAMILIES:
        with config.sae.unlocked():
            config.sae[old] = FAMILIES[old].defaults()


def _convert(text: str, field_type: type) -> Any:
    if field_type is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError("use true or false")
    if field_type is int:
        try:
            return int(text)
        except ValueError:
            as_float = float(text)  # accepts 1e6; rejects 2.5 below
            if not as_float.is_integer():
                raise ValueError("not an integer") from None
            return int(as_float)
    if field_type is float:
        return float(text)
    return field_type(text)


def _unknown_key_message(dotted: str, node) -> str:
    leaf = dotted.split(".")[-1]
    known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    close = [repr(c) for c in difflib.get_close_matches(leaf, known, n=3)]
    group = node.get(node.get("family")) if isinstance(node, ml_collections.ConfigDict) and "family" in node else None
    if isinstance(group, ml_collections.ConfigDict):  # under `sae`: the active family's keys too
        prefix = dotted.rsplit(".", 1)[0]
        close += [f"{c!r} ({prefix}.{node.family}.{c})" for c in difflib.get_close_matches(leaf, list(group), n=3)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {dotted!r}.{hint} Known keys here: {', '.join(sorted(known))}"


# ---------------------------------------------------------------------------- validation


def migrate_legacy(tree: dict) -> dict:
    """A config dict in today's layout, from one that may predate family groups.

    Before families owned their keys, TopK's keys (k, k_aux, auxk_coef,
    multi_topk*) sat directly under `sae`; saved configs of such runs
    (checkpoint meta, results.json, a sweep's config.json) and config files
    that set `config.sae.k` are moved into `sae.<family>` here. A key that
    belongs to another family than `sae.family` is an error.
    """
    from saejax.models import FAMILIES

    sae = tree.get("sae")
    if not isinstance(sae, dict):
        return tree
    family = sae.get("family", "topk")
    stray = [key for key in sae if key not in GENERIC_SAE_KEYS and key not in FAMILIES]
    if not stray:
        return tree
    sae = dict(sae)
    own = FAMILIES[family].defaults() if family in FAMILIES else {}
    group = dict(sae.get(family) or {})
    for key in stray:
        if key in own:
            group[key] = sae.pop(key)
            continue
        owners = [name for name, cls in FAMILIES.items() if key in cls.defaults()]
        if owners:
            raise ConfigError(f"config key 'sae.{key}' belongs to family {owners[0]!r} "
                              f"(sae.{owners[0]}.{key}), but sae.family={family!r}")
    if family in FAMILIES:
        sae[family] = group
    return {**tree, "sae": sae}


def _migrate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`migrate_legacy` for a config file's (unlocked) ConfigDict; returns a config in today's layout."""
    tree = config.to_dict()
    migrated = migrate_legacy(tree)
    if migrated is tree:
        return config
    fresh = base_config()
    for key, value in flatten(migrated).items():
        set_value(fresh, key, value)
    return fresh


def _check_schema(config, reference, prefix: str = "") -> None:
    """Same keys as base_config(), each of a compatible type."""
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in reference:
            raise ConfigError(_unknown_key_message(path, reference))
        ref_value, value = reference[key], config[key]
        if isinstance(ref_value, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config key {path!r} must be a group of keys, got {value!r}")
            _check_schema(value, ref_value, path + ".")
            continue
        expected = reference.get_type(key)
        if value is None:
            if ref_value is not None:
                raise ConfigError(f"config key {path!r} must be set (a {expected.__name__})")
            continue
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"config key {path!r} expects {expected.__name__}, got {type(value).__name__} {value!r}")
    missing = [k for k in reference.keys() if k not in config]
    if missing:
        raise ConfigError(f"config group {prefix.rstrip('.') or 'root'!r} lacks keys {missing}; start config files from saejax.config.base_config()")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config, num_devices: int) -> tuple[int, int]:
    """Check a config before any compilation; returns the resolved (data, model) mesh shape."""
    from saejax.algorithms import ALGORITHMS
    from saejax.models import FAMILIES
    from saejax.sharding import resolve_mesh_shape

    _check_schema(config, base_config())
    sae, optim, data, train, ckpt = config.sae, config.optim, config.data, config.train, config.checkpoint

    _require(sae.family in FAMILIES, f"sae.family={sae.family!r} is not a family; the families are: "
             f"{', '.join(sorted(FAMILIES))}")
    _require(train.algorithm in ALGORITHMS, f"train.algorithm={train.algorithm!r} is not one of {sorted(ALGORITHMS)}")
    _require(sae.d >= 1, f"sae.d={sae.d} must be >= 1")
    _require(sae.n >= 1, f"sae.n={sae.n} must be >= 1")
    _check_inactive_groups(config)
    FAMILIES[sae.family].check(sae[sae.family], config)
    ALGORITHMS[train.algorithm].check(train.get(train.algorithm), config)
    _require(0 < sae.dead_tokens < 2**31, f"sae.dead_tokens={sae.dead_tokens} must be in (0, 2^31)")
    _require(0 < sae.dense_threshold <= 1, f"sae.dense_threshold={sae.dense_threshold} must be in (0, 1]")
    _require(sae.init_sample_rows >= 1, f"sae.init_sample_rows={sae.init_sample_rows} must be >= 1")

    _require(optim.lr is None or (optim.lr > 0 and math.isfinite(optim.lr)),
             f"optim.lr={optim.lr} must be a positive number (or unset for the family's default)")
    _require(0 <= optim.b1 < 1 and 0 <= optim.b2 < 1, f"optim.b1={optim.b1}, optim.b2={optim.b2} must be in [0, 1)")
    _require(optim.eps > 0, f"optim.eps={optim.eps} must be > 0")
    _require(optim.warmup_steps >= 0, f"optim.warmup_steps={optim.warmup_steps} must be >= 0")
    _require(0 <= optim.ema_decay < 1, f"optim.ema_decay={optim.ema_decay} must be in [0, 1) (0 disables the EMA)")

    from saejax.data import SOURCES

    _require(data.source in SOURCES, f"data.source={data.source!r} is not one of {sorted(SOURCES)}")
    _require(data.source != "npy" or bool(data.path), "data.source='npy' needs data.path=/path/to/activations.npy")
    _require(data.source != "store" or bool(data.path),
             "data.source='store' needs data.path=/path/to/store (a directory written by `saejax harvest`)")
    _require(data.batch_size >= 1, f"data.batch_size={data.batch_size} must be >= 1")
    _require(0 <= data.eval_fraction < 1, f"data.eval_fraction={data.eval_fraction} must be in [0, 1)")
    _require(data.prefetch >= 1, f"data.prefetch={data.prefetch} must be >= 1")
    syn = data.synthetic
    _require(syn.num_features >= 1, f"data.synthetic.num_features={syn.num_features} must be >= 1")
    _require(0 < syn.avg_active <= syn.num_features, f"data.synthetic.avg_active={syn.avg_active} must be in (0, num_features]")
    _require(0 <= syn.min_magnitude <= syn.max_magnitude, "data.synthetic needs 0 <= min_magnitude <= max_magnitude")
    _require(syn.noise_std >= 0, f"data.synthetic.noise_std={syn.noise_std} must be >= 0")

    _require(train.steps >= 1, f"train.steps={train.steps} must be >= 1")
    _require(train.log_every >= 1, f"train.log_every={train.log_every} must be >= 1")
    _require(train.eval_batches >= 0, f"train.eval_batches={train.eval_batches} must be >= 0")
    _require(train.compute_dtype in COMPUTE_DTYPES, f"train.compute_dtype={train.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
    _require(train.topk_impl in TOPK_IMPLS, f"train.topk_impl={train.topk_impl!r} is not one of {TOPK_IMPLS}")

    _require(ckpt.every_steps >= 0, f"checkpoint.every_steps={ckpt.every_steps} must be >= 0")
    _require(ckpt.keep_last >= 1, f"checkpoint.keep_last={ckpt.keep_last} must be >= 1")
    _require(ckpt.keep_every >= 0, f"checkpoint.keep_every={ckpt.keep_every} must be >= 0")
    _require(config.device_memory_gb >= 0, f"device_memory_gb={config.device_memory_gb} must be >= 0")

    _check_eval(config)

    try:
        mesh_data, mesh_model = resolve_mesh_shape(config.mesh.data, config.mesh.model, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(
        sae.n % mesh_model == 0,
        f"sae.n={sae.n} is not divisible by the model axis ({mesh_model} devices); "
        f"choose n as a multiple of {mesh_model} or change mesh.model",
    )
    _require(
        data.batch_size % mesh_data == 0,
        f"data.batch_size={data.batch_size} is not divisible by the data axis ({mesh_data} devices); "
        f"choose a multiple of {mesh_data} or change mesh.data",
    )
    return mesh_data, mesh_model


def _check_inactive_groups(config) -> None:
    """A key of a family other than sae.family (or of an algorithm other than train.algorithm),
    changed from its default, is a mistake: say so."""
    from saejax.algorithms import ALGORITHMS
    from saejax.models import FAMILIES

    for name, algorithm in ALGORITHMS.items():
        if name != config.train.algorithm and algorithm.defaults() is not None:
            _refuse_changed_keys(config.train[name], algorithm.defaults(), "train", name, "algorithm",
                                 config.train.algorithm)
    active = FAMILIES[config.sae.family]
    used = {config.sae.family, *active.inner_families(config.sae[config.sae.family])}
    for name, family in FAMILIES.items():
        if name not in used:
            _refuse_changed_keys(config.sae[name], family.defaults(), "sae", name, "family", config.sae.family)


def _refuse_changed_keys(group, defaults, parent: str, name: str, kind: str, chosen: str) -> None:
    """A key of group `parent.name` (a family or algorithm not chosen) changed from its default."""
    defaults = flatten(defaults.to_dict())
    for key, value in flatten(group.to_dict()).items():
        if value != defaults.get(key):
            selector = f"{parent}.{kind}"
            raise ConfigError(
                f"config key '{parent}.{name}.{key}' is set ({value!r}) but belongs to {kind} {name!r}, and "
                f"{selector}={chosen!r}; set {selector}={name} or remove the key")


# ---------------------------------------------------------------------------- run identity


def _check_eval(config) -> None:
    from saejax.evaluation import EVALUATORS

    _require(config.eval.contexts >= 1, f"eval.contexts={config.eval.contexts} must be >= 1")
    _require(config.eval.batch_contexts >= 1, f"eval.batch_contexts={config.eval.batch_contexts} must be >= 1")
    for name, evaluator in EVALUATORS.items():
        problems = evaluator.check(config.eval[name], config)
        _require(not problems, "; ".join(problems))


def _group_names() -> dict[str, list[str]]:
    """Parent group -> the names of its optional sub-groups, one per registered choice."""
    from saejax.algorithms import ALGORITHMS
    from saejax.data import SOURCES
    from saejax.models import FAMILIES

    return {"sae": sorted(FAMILIES), "data": sorted(SOURCES), "train": sorted(ALGORITHMS)}


def _inner_groups(sae, family) -> tuple[str, ...]:
    """The families whose groups the active family reads (SAEFamily.inner_families)."""
    from saejax.models import FAMILIES

    if not isinstance(sae, dict) or family not in FAMILIES or not isinstance(sae.get(family), dict):
        return ()
    return tuple(name for name in FAMILIES[family].inner_families(sae[family]) if name != family)


def active_tree(values) -> dict:
    """The config as a dict with only the groups a run uses, in a layout stable across additions.

    Of `sae.<family>`, `data.<source>` and `train.<algorithm>` groups only the
    chosen one stays, and the family's keys are listed directly under `sae`
    (as they were before families owned groups), so registering a new family,
    source or algorithm changes no existing run's identity, and TopK runs keep
    theirs. Reporting keys are dropped. Accepts a ConfigDict or a saved dict
    (also one of the layout before family groups).
    """
    tree = migrate_legacy(values.to_dict() if isinstance(values, ml_collections.ConfigDict) else dict(values))
    tree = {key: (dict(value) if isinstance(value, dict) else value) for key, value in tree.items()}
    choices = {"sae": tree.get("sae", {}).get("family"), "data": tree.get("data", {}).get("source"),
               "train": tree.get("train", {}).get("algorithm")}
    inner = _inner_groups(tree.get("sae"), choices["sae"])
    for parent, names in _group_names().items():
        node = tree.get(parent)
        if not isinstance(node, dict):
            continue
        for name in names:
            group = node.pop(name, None)
            if parent == "sae" and name in inner and isinstance(group, dict):
                node[name] = group  # a wrapper family's inner family: its group, whole
                continue
            if name != choices[parent] or not isinstance(group, dict):
                continue
            if parent == "sae":
                from saejax.models import FAMILIES

                late = FAMILIES[name].unhashed_defaults() if name in FAMILIES else {}
                group = {k: v for k, v in group.items() if not (k in late and v == late[k])}
                node.update(group)  # the family's keys, where they were before family groups
            else:
                node[name] = group
    for dotted in REPORTING_KEYS:
        parent, leaf = dotted.split(".")
        tree.get(parent, {}).pop(leaf, None)
    for group in REPORTING_GROUPS:
        tree.pop(group, None)
    return tree


# ---------------------------------------------------------------------------- config files


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"sae": {"n": 1}} -> {"sae.n": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_from_dict(values: dict, schema=None) -> ml_collections.ConfigDict:
    """A locked config from `config.to_dict()` output (e.g. a sweep run's config.json, old ones too)."""
    config = (schema or base_config)()
    if schema is None:
        values = migrate_legacy(values)
    for key, value in flatten(values).items():
        set_value(config, key, value)
    _check_schema(config, (schema or base_config)())
    config.lock()
    return config


def builtin_configs(directory: str = BUILTIN_CONFIG_DIR) -> list[str]:
    return sorted(f[:-3] for f in os.listdir(directory) if f.endswith(".py") and not f.startswith("_"))


def resolve_config_path(name_or_path: str, directory: str = BUILTIN_CONFIG_DIR) -> str:
    """A config file path, or the name of a built-in config (e.g. 'default')."""
    if os.path.isfile(name_or_path):
        return name_or_path
    builtin = os.path.join(directory, name_or_path + ("" if name_or_path.endswith(".py") else ".py"))
    if os.path.isfile(builtin):
        return builtin
    raise ConfigError(
        f"config file {name_or_path!r} not found; give a path to a .py file with get_config(), "
        f"or one of the built-in configs: {', '.join(builtin_configs(directory))}"
    )


def load_config(spec: str, overrides: Sequence[tuple[str, str]] = (), schema=None,
                builtin_dir: str = BUILTIN_CONFIG_DIR) -> ml_collections.ConfigDict:
    """Load `path[:variant]` via its get_config(variant), then apply `key=value` overrides.

    `schema()` gives every allowed key (default: `base_config`). The result is
    locked: later assignment to a key that does not exist fails.
    """
    schema = schema or base_config
    path, _, variant = spec.partition(":")
    path = resolve_config_path(path, builtin_dir)
    module_spec = importlib.util.spec_from_file_location(f"saejax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file: say which and why
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    if variant and not takes_arg:
        raise ConfigError(f"config file {path} takes no variant, but {variant!r} was given")
    try:
        config = module.get_config(variant or None) if takes_arg else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # e.g. a value of the wrong type for its key
        raise ConfigError(f"get_config() in {path} failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path} returned {type(config).__name__}, not a ConfigDict")
    if schema is base_config:
        config = _migrate_config(config)  # a config file written before families owned their keys
    _check_schema(config, schema())  # a misspelt key in the file itself
    for key, value in overrides:
        set_value(config, key, value)
    config.lock()
    return config

"""What every format adapter shares: the spec, scale folding, hookpoint names, atomic directories.

A *spec* is what `saejax.export` writes and `load_sae` reads: tensors by the
family's inference names (numpy, float32) and the cfg.json dict (family, d, n,
options, activation, normalization, ...). Adapters translate between a spec
and their library's files; they never see training state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from saejax.errors import SaeJaxError
from saejax.export import CONFIG_FILE, LAYER_NORM, WEIGHTS_FILE

Tensors = dict[str, np.ndarray]


class InteropError(SaeJaxError):
    """A file that cannot be read or written in the requested format (bad input: exit code 2)."""

    exit_code = 2


# How each inference tensor scales when the inputs are multiplied by s: codes (and so every bias
# and threshold in pre-activation or input units) are divided by s; weights and gated's
# log-multiplier r_mag are unitless. A tensor missing here fails loudly rather than unfolded.
_UNITS = {"W_enc": 0, "W_dec": 0, "r_mag": 0,
          "b_enc": 1, "b_pre": 1, "b_dec": 1, "threshold": 1, "b_gate": 1, "b_mag": 1}


def fold_scale(tensors: Tensors, cfg: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
    """The same SAE taking raw activations: every bias and threshold divided by the scale.

    saejax encodes x * scale and divides reconstructions by scale. With the
    weights kept and every tensor in activation units divided by s, encoding
    raw x gives codes / s and decoding them gives the raw reconstruction, so
    decoder rows keep their norms and JumpReLU thresholds stay comparable to
    the codes (folding the scale into b_dec alone, or into the weights but
    not the threshold, is the known way to get this wrong).
    """
    normalization = dict(cfg.get("normalization") or {})
    scale = float(normalization.get("scale", 1.0))
    if normalization.get("method") == LAYER_NORM or scale == 1.0:
        return dict(tensors), cfg
    folded = {}
    for name, value in tensors.items():
        if name not in _UNITS:
            raise InteropError(f"cannot fold the normalisation scale into tensor {name!r} of family "
                               f"{cfg['family']!r}: its units are unknown to saejax.interop.common")
        folded[name] = (np.asarray(value, np.float32) / np.float32(scale) ** _UNITS[name]).astype(np.float32)
    normalization.update({"scale": 1.0, "folded_scale": scale,
                          "method": f"none: scale {scale:.6g} folded into biases and thresholds"})
    return folded, {**cfg, "normalization": normalization}


def input_bias_into_encoder(tensors: Tensors, bias: str, sign: float) -> Tensors:
    """b_enc + sign * bias @ W_enc: moves an input-bias subtraction into (sign=-1) or out of the encoder."""
    out = dict(tensors)
    shift = np.asarray(tensors[bias], np.float64) @ np.asarray(tensors["W_enc"], np.float64)
    out["b_enc"] = (np.asarray(tensors["b_enc"], np.float64) + sign * shift).astype(np.float32)
    return out


# ---------------------------------------------------------------------------- hookpoints

_SAEJAX = re.compile(r"resid_(pre|post)\.(\d+)")
_TL = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")
_SPARSIFY = re.compile(r"(?:[\w.]+\.)?(?:layers|h|layer)\.(\d+)")


def parse_hookpoint(name: str | None) -> tuple[str, int] | None:
    """("pre"|"post", layer) of a residual-stream hookpoint in any known convention, else None."""
    if not name:
        return None
    if m := _SAEJAX.fullmatch(name):
        return m.group(1), int(m.group(2))
    if m := _TL.fullmatch(name):
        return m.group(2), int(m.group(1))
    if m := _SPARSIFY.fullmatch(name):  # sparsify names the block module: its output is resid_post
        return "post", int(m.group(1))
    return None


def saejax_hookpoint(name: str | None) -> str | None:
    parsed = parse_hookpoint(name)
    return f"resid_{parsed[0]}.{parsed[1]}" if parsed else name


def transformerlens_hookpoint(name: str | None) -> str | None:
    """TransformerLens's `blocks.L.hook_resid_post` / `hook_resid_pre`; other names unchanged."""
    parsed = parse_hookpoint(name)
    return f"blocks.{parsed[1]}.hook_resid_{parsed[0]}" if parsed else name


def sparsify_hookpoint(name: str | None) -> str | None:
    """sparsify's `layers.L` (the output of block L); resid_pre.L is the output of block L-1."""
    parsed = parse_hookpoint(name)
    if not parsed:
        return name
    kind, layer = parsed
    if kind == "post":
        return f"layers.{layer}"
    return f"layers.{layer - 1}" if layer > 0 else "embed_tokens"


def source_hookpoint(cfg: dict[str, Any]) -> str | None:
    return (cfg.get("data") or {}).get("hookpoint")


def source_model(cfg: dict[str, Any]) -> str | None:
    model = (cfg.get("data") or {}).get("model")
    return model.get("name") if isinstance(model, dict) else model


def store_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    """context_size, prepend_bos, exclude_special_tokens of the store a run trained on, where readable."""
    path = (cfg.get("data") or {}).get("path")
    if not path or not os.path.isfile(os.path.join(path, "ledger.json")):
        return {}
    with open(os.path.join(path, "ledger.json")) as f:
        ledger = json.load(f)
    excluded = ledger.get("excluded_tokens") or {}
    facts = {"context_size": ledger.get("context_length"), "dataset_path": (ledger.get("text") or {}).get("source"),
             "exclude_special_tokens": excluded.get("special_tokens_excluded")}
    if "template_prefix" in excluded:
        facts["prepend_bos"] = bool(excluded["template_prefix"])
    return {k: v for k, v in facts.items() if v is not None}


# ---------------------------------------------------------------------------- files


def read_json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise InteropError(f"{path}: file not found; {what}")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"{path}: not readable as JSON ({e}); {what}") from None
    if not isinstance(value, dict):
        raise InteropError(f"{path}: expected a JSON object; {what}")
    return value


def require_keys(mapping, keys, path: str, what: str) -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise InteropError(f"{path}: missing {', '.join(map(repr, missing))}; expected {what}")


def check_shape(name: str, value, shape: tuple[int, ...], path: str, meaning: str) -> np.ndarray:
    value = np.asarray(value)
    if tuple(value.shape) != tuple(shape):
        raise InteropError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, expected "
                           f"{tuple(shape)} ({meaning})")
    return value.astype(np.float32)


def load_safetensors(path: str, what: str) -> Tensors:
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise InteropError(f"{path}: file not found; {what}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise InteropError(f"{path}: not a readable safetensors file ({e}); {what}") from None


def torch_load(path: str, what: str):
    """A torch.save'd object, tensors only (weights_only): needs torch (the harvest extra)."""
    try:
        import torch
    except ImportError:
        raise InteropError(f"reading {path} needs PyTorch: pip install 'saejax[harvest]'") from None
    if not os.path.isfile(path):
        raise InteropError(f"{path}: file not found; {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InteropError(f"{path}: not a readable torch.save file ({e}); {what}") from None


def torch_save(obj, path: str) -> None:
    import torch

    torch.save(obj, path)


def to_torch(tensors: Tensors) -> dict[str, Any]:
    import torch

    return {name: torch.from_numpy(np.ascontiguousarray(value, np.float32)) for name, value in tensors.items()}


def to_numpy(value) -> np.ndarray:
    return value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)


def write_directory(out: str, fill: Callable[[str], None]) -> str:
    """Run fill(tmp) on a fresh sibling directory, then rename it to `out`: all of it or none of it.

    `out` must not exist or be an empty directory, so nothing is ever overwritten
    and a failure (bad input, full disk, interrupt) leaves no half-written output.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InteropError(f"{out} already exists and is not an empty directory; "
                           "choose a new --out (nothing is overwritten)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        fill(tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_run(out: str, tensors: Tensors, cfg: dict[str, Any]) -> str:
    """A saejax run directory (sae.safetensors + cfg.json) that `load_sae` reads."""
    from saejax.export import export_sae

    return write_directory(out, lambda tmp: export_sae(tmp, tensors, cfg))


def read_run(run_dir: str) -> tuple[Tensors, dict[str, Any]]:
    """(tensors, cfg) of a saejax run directory, checked against its family's inference specs."""
    what = "a saejax run directory holds sae.safetensors + cfg.json (written at the end of `saejax train`)"
    if not os.path.isdir(run_dir):
        raise InteropError(f"{run_dir}: not a directory; {what}")
    cfg = read_json(os.path.join(run_dir, CONFIG_FILE), what)
    tensors = load_safetensors(os.path.join(run_dir, WEIGHTS_FILE), what)
    family = family_of(cfg, os.path.join(run_dir, CONFIG_FILE))
    check_tensors(family, tensors, os.path.join(run_dir, WEIGHTS_FILE))
    return tensors, cfg


def family_of(cfg: dict[str, Any], path: str):
    from saejax.export import _family_from_cfg

    require_keys(cfg, ("family", "d", "n"), path, "a saejax cfg.json with family, d and n")
    try:
        return _family_from_cfg(cfg)
    except SaeJaxError as e:
        raise InteropError(f"{path}: {e}") from None


def check_tensors(family, tensors: Tensors, path: str) -> None:
    specs = family.inference_specs()
    require_keys(tensors, list(specs), path, f"the tensors of a {family.name} SAE: {', '.join(specs)}")
    for name, spec in specs.items():
        check_shape(name, tensors[name], spec.shape, path, f"{family.name} d={family.d} n={family.n}")


def make_spec(family_name: str, d: int, n: int, options: dict[str, Any], tensors: Tensors,
              normalization: dict[str, Any], source: dict[str, Any], path: str) -> tuple[Tensors, dict]:
    """The spec of an imported SAE: the family's own export cfg, the normalisation, provenance."""
    from saejax.config import base_config, set_value
    from saejax.models import get_family

    config = base_config()
    set_value(config, "sae.family", family_name)
    set_value(config, "sae.d", int(d))
    set_value(config, "sae.n", int(n))
    for key, value in options.items():
        set_value(config, f"sae.{family_name}.{key}", value)
    config.lock()
    family = get_family(config)
    tensors = {name: np.asarray(value, np.float32) for name, value in tensors.items()}
    check_tensors(family, tensors, path)
    tensors, cfg = family.export(tensors)
    cfg["normalization"] = normalization
    cfg["data"] = {"hookpoint": saejax_hookpoint(source.get("hookpoint")), "model": source.get("model")}
    cfg["imported"] = source
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}, cfg


NO_NORMALIZATION = {"scale": 1.0, "method": "none (imported: the SAE takes raw activations)"}

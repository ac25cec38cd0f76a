"""SAELens v6: `cfg.json` + `sae_weights.safetensors`, read by `sae_lens.SAE.load_from_disk`.

Tensors are W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec, and
`threshold` (d_sae) for JumpReLU; gated has b_gate, r_mag, b_mag instead of
b_enc. TopK keeps `k` (and `rescale_acts_by_decoder_norm`) in cfg.json. SAELens
JumpReLU encodes relu(pre) * (pre > threshold), which is saejax's BatchTopK
inference, so BatchTopK and Matryoshka export as JumpReLU with their threshold
(as SAELens does for its own BatchTopK). `apply_b_dec_to_input` false means
pre = x @ W_enc + b_enc; on import that is moved into b_enc.
"""

from __future__ import annotations

import os

import numpy as np

from saejax.export import LAYER_NORM, write_json_atomic
from saejax.interop import common
from saejax.interop.common import InteropError

NAME = "saelens"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FAMILIES = ("relu", "topk", "jumprelu", "batchtopk", "matryoshka", "gated")
_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                 "matryoshka": "jumprelu", "gated": "gated"}
_IMPORTED = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_WHAT = "a SAELens SAE directory holds cfg.json + sae_weights.safetensors (SAE.save_model)"


def write(tensors, cfg, out: str) -> list[str]:
    family, d, n = cfg["family"], int(cfg["d"]), int(cfg["n"])
    input_bias = "b_dec" if "b_dec" in tensors else "b_pre"
    weights = {"W_enc": tensors["W_enc"], "W_dec": tensors["W_dec"], "b_dec": tensors[input_bias]}
    extra = {}
    if family == "gated":
        weights.update({k: tensors[k] for k in ("b_gate", "r_mag", "b_mag")})
    else:
        weights["b_enc"] = tensors["b_enc"]
    if "threshold" in tensors:
        weights["threshold"] = np.broadcast_to(tensors["threshold"], (n,)).astype(np.float32)
    if family == "topk":
        extra = {"k": int(cfg["k"]), "rescale_acts_by_decoder_norm": False}
    layer_norm = (cfg.get("normalization") or {}).get("method") == LAYER_NORM
    hook = common.transformerlens_hookpoint(common.source_hookpoint(cfg))
    saelens_cfg = {
        "architecture": _ARCHITECTURE[family], "d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "layer_norm" if layer_norm else "none",
        "reshape_activations": "none", **extra,
        "metadata": {"model_name": common.source_model(cfg), "hook_name": hook,
                     "hook_head_index": None, "prepend_bos": None, "exclude_special_tokens": None,
                     "context_size": None, "dataset_path": None, "sae_lens_training_version": None,
                     **common.store_facts(cfg),
                     "saejax": {"family": family, "activation": cfg.get("activation"),
                                "sparsity_control": cfg.get("sparsity_control"),
                                "normalization": cfg.get("normalization"),
                                "hookpoint": common.source_hookpoint(cfg)}},
    }
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()},
              os.path.join(out, WEIGHTS_FILE))
    write_json_atomic(os.path.join(out, CFG_FILE), saelens_cfg)
    return [CFG_FILE, WEIGHTS_FILE]


def read(src: str):
    cfg_path, weights_path = os.path.join(src, CFG_FILE), os.path.join(src, WEIGHTS_FILE)
    if not os.path.isdir(src):
        raise InteropError(f"{src}: not a directory; {_WHAT}")
    cfg = common.read_json(cfg_path, _WHAT)
    common.require_keys(cfg, ("architecture", "d_in", "d_sae"), cfg_path, "SAELens cfg.json fields")
    architecture = cfg["architecture"]
    if architecture not in _IMPORTED:
        raise InteropError(
            f"{cfg_path}: architecture {architecture!r} has no saejax family; saejax imports the SAELens "
            f"architectures {', '.join(sorted(_IMPORTED))} (transcoders, skip connections and "
            "matching pursuit have no saejax equivalent)")
    if cfg.get("reshape_activations", "none") != "none":
        raise InteropError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} (hook_z "
                           "attention-head SAEs) has no saejax equivalent; expected 'none'")
    method = cfg.get("normalize_activations", "none")
    if method not in ("none", "expected_average_only_in", "layer_norm"):
        raise InteropError(f"{cfg_path}: normalize_activations={method!r} has no saejax equivalent; "
                           "saejax imports none, expected_average_only_in (already folded, as "
                           "SAE.load_from_disk assumes) and layer_norm")
    d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    raw = common.load_safetensors(weights_path, _WHAT)
    family = _IMPORTED[architecture]
    encoder_bias = ("b_gate", "r_mag", "b_mag") if family == "gated" else ("b_enc",)
    names = ("W_enc", "W_dec", "b_dec", *encoder_bias) + (("threshold",) if family == "jumprelu" else ())
    common.require_keys(raw, names, weights_path, f"the tensors of a SAELens {architecture} SAE")
    shapes = {"W_enc": (d, n), "W_dec": (n, d), "b_dec": (d,), "threshold": (n,),
              "b_enc": (n,), "b_gate": (n,), "r_mag": (n,), "b_mag": (n,)}
    meaning = f"cfg.json has d_in={d}, d_sae={n}"
    t = {k: common.check_shape(k, raw[k], shapes[k], weights_path, meaning) for k in names}
    if not cfg.get("apply_b_dec_to_input", True):
        if family == "gated":
            raise InteropError(f"{cfg_path}: a gated SAE with apply_b_dec_to_input=false has no saejax "
                               "equivalent; expected apply_b_dec_to_input=true")
        t = common.input_bias_into_encoder(t, "b_dec", +1.0)
    options = {}
    if family == "topk":
        common.require_keys(cfg, ("k",), cfg_path, "k, the number of active latents of a TopK SAE")
        options["k"] = int(cfg["k"])
        if cfg.get("rescale_acts_by_decoder_norm"):  # top-k of pre * |W_dec| == top-k after folding the norms
            norms = np.maximum(np.linalg.norm(t["W_dec"], axis=1), 1e-8).astype(np.float32)
            t = {**t, "W_enc": t["W_enc"] * norms, "b_enc": t["b_enc"] * norms, "W_dec": t["W_dec"] / norms[:, None]}
    if family == "jumprelu" and np.any(t["threshold"] < 0):
        raise InteropError(f"{weights_path}: tensor 'threshold' has negative entries; saejax's jumprelu "
                           "encodes pre * (pre > threshold), which equals SAELens's relu(pre) * (pre > "
                           "threshold) only for thresholds >= 0")
    tensors = _to_saejax(family, t)
    normalization = ({"scale": 1.0, "method": LAYER_NORM, "eps": 1e-5} if method == "layer_norm"
                     else dict(common.NO_NORMALIZATION))
    metadata = cfg.get("metadata") or {}
    source = {"format": NAME, "path": os.path.abspath(src), "architecture": architecture,
              "hookpoint": metadata.get("hook_name"), "model": metadata.get("model_name"),
              "normalize_activations": method}
    return common.make_spec(family, d, n, options, tensors, normalization, source, weights_path)


def _to_saejax(family: str, t):
    if family in ("relu", "topk"):
        return {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_pre": t["b_dec"]}
    return dict(t)  # jumprelu and gated use SAELens's names

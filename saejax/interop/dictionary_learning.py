"""dictionary_learning (saprmarks): `ae.pt` (a torch.save'd state dict) + `config.json`.

config.json is {"trainer": {"dict_class", "activation_dim", "dict_size", "k",
"lm_name", "layer", "submodule_name", ...}, "buffer": {...}} as its
training loop writes it; `<dict_class>.from_pretrained("ae.pt")` loads the
weights. The dictionaries saejax reads and writes:

- AutoEncoder: bias (d), encoder.weight (n, d), encoder.bias, decoder.weight (d, n);
  relu((x - bias) @ encoder.weight.T + encoder.bias) -> saejax relu.
- AutoEncoderTopK: encoder.*, decoder.weight, b_dec, buffers k and threshold;
  top-k of relu(encoder(x - b_dec)) -> saejax topk.
- BatchTopKSAE: the same tensors; inference relu(pre) masked by relu(pre) > threshold
  (one scalar) -> saejax batchtopk with a global threshold (Matryoshka exports as it).
- JumpReluAutoEncoder: W_enc (d, n), b_enc, W_dec (n, d), b_dec, threshold (n); it
  does not subtract b_dec before encoding, so b_enc is shifted by b_dec @ W_enc.
- GatedAutoEncoder: decoder_bias, encoder.weight (n, d), r_mag, gate_bias, mag_bias,
  decoder.weight (d, n); saejax gated's b_dec, W_enc, r_mag, b_gate, b_mag, W_dec.
"""

from __future__ import annotations

import os

import numpy as np

from saejax.export import LAYER_NORM, write_json_atomic
from saejax.interop import common
from saejax.interop.common import InteropError

NAME = "dictionary_learning"
WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
FAMILIES = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu", "gated")
_CLASS = {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE",
          "matryoshka": "BatchTopKSAE", "jumprelu": "JumpReluAutoEncoder", "gated": "GatedAutoEncoder"}
_IMPORTED = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
             "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}
_GATED = {"decoder_bias": "b_dec", "encoder.weight": "W_enc", "r_mag": "r_mag", "gate_bias": "b_gate",
          "mag_bias": "b_mag", "decoder.weight": "W_dec"}  # dictionary_learning name -> saejax name
_WHAT = "a dictionary_learning SAE directory holds ae.pt + config.json (as its trainSAE writes them)"


def write(tensors, cfg, out: str) -> list[str]:
    family, d, n = cfg["family"], int(cfg["d"]), int(cfg["n"])
    if (cfg.get("normalization") or {}).get("method") == LAYER_NORM:
        raise InteropError("dictionary_learning dictionaries take raw activations; this SAE layer-normalises "
                           "each token: export it with --format saelens instead")
    if family in ("batchtopk", "matryoshka") and np.ndim(tensors["threshold"]) != 0:
        raise InteropError("dictionary_learning's BatchTopKSAE has one threshold for all latents; this SAE "
                           "has one per latent (threshold_per_latent): export it with --format saelens")
    if "threshold" in tensors and not np.all(np.isfinite(tensors["threshold"])):
        raise InteropError(f"this {family} SAE's inference threshold was never estimated (it is inf: the run "
                           "stopped before threshold_start_step); train longer, then export")
    import torch

    if family == "jumprelu":
        t = common.input_bias_into_encoder(tensors, "b_dec", -1.0)
        state = common.to_torch({k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")})
    elif family == "gated":
        state = common.to_torch({dl: tensors[ours] for dl, ours in _GATED.items()})
        state["encoder.weight"], state["decoder.weight"] = state["encoder.weight"].T, state["decoder.weight"].T
    else:
        state = common.to_torch({"encoder.weight": tensors["W_enc"].T, "encoder.bias": tensors["b_enc"],
                                 "decoder.weight": tensors["W_dec"].T})
        if family == "relu":
            state["bias"] = common.to_torch({"b": tensors["b_pre"]})["b"]
        else:
            state["b_dec"] = common.to_torch({"b": tensors["b_pre"]})["b"]
            state["k"] = torch.tensor(int(cfg["k"]), dtype=torch.int)
            threshold = float(tensors["threshold"]) if "threshold" in tensors else -1.0
            state["threshold"] = torch.tensor(threshold, dtype=torch.float32)
    hook = common.parse_hookpoint(common.source_hookpoint(cfg))
    trainer = {"dict_class": _CLASS[family], "trainer_class": "saejax", "activation_dim": d, "dict_size": n,
               "lm_name": common.source_model(cfg), "layer": hook[1] if hook else None,
               "submodule_name": common.sparsify_hookpoint(common.source_hookpoint(cfg)),
               "saejax": {"family": family, "activation": cfg.get("activation"),
                          "normalization": cfg.get("normalization"),
                          "hookpoint": common.source_hookpoint(cfg)}}
    if "k" in cfg:
        trainer["k"] = int(cfg["k"])
    common.torch_save(state, os.path.join(out, WEIGHTS_FILE))
    write_json_atomic(os.path.join(out, CONFIG_FILE), {"trainer": trainer})
    return [WEIGHTS_FILE, CONFIG_FILE]


def read(src: str):
    if not os.path.isdir(src):
        raise InteropError(f"{src}: not a directory; {_WHAT}")
    config_path, path = os.path.join(src, CONFIG_FILE), os.path.join(src, WEIGHTS_FILE)
    config = common.read_json(config_path, _WHAT)
    common.require_keys(config, ("trainer",), config_path, "a 'trainer' section naming dict_class")
    trainer = config["trainer"]
    common.require_keys(trainer, ("dict_class",), config_path, "trainer.dict_class")
    dict_class = trainer["dict_class"]
    if dict_class not in _IMPORTED:
        raise InteropError(f"{config_path}: dict_class {dict_class!r} has no saejax family; saejax imports "
                           f"{', '.join(sorted(_IMPORTED))}")
    family = _IMPORTED[dict_class]
    state = common.torch_load(path, _WHAT)
    if not isinstance(state, dict):
        raise InteropError(f"{path}: holds a {type(state).__name__}, expected a state dict; {_WHAT}")
    if family == "jumprelu":
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        common.require_keys(state, names, path, f"the tensors of a {dict_class}")
        d, n = common.to_numpy(state["W_enc"]).shape
    elif family == "gated":
        common.require_keys(state, tuple(_GATED), path, f"the tensors of a {dict_class}")
        n, d = common.to_numpy(state["encoder.weight"]).shape
    else:
        bias = "bias" if family == "relu" else "b_dec"
        names = ("encoder.weight", "encoder.bias", "decoder.weight", bias)
        common.require_keys(state, names, path, f"the tensors of a {dict_class}")
        n, d = common.to_numpy(state["encoder.weight"]).shape
    for key, expected in (("activation_dim", d), ("dict_size", n)):
        if key in trainer and int(trainer[key]) != expected:
            raise InteropError(f"{path}: the weights have {key}={expected} but {config_path} records "
                               f"trainer.{key}={trainer[key]}; expected the config.json of this ae.pt")
    meaning = f"activation_dim={d}, dict_size={n}"

    def get(name, shape):
        return common.check_shape(name, common.to_numpy(state[name]), shape, path, meaning)

    options = {}
    if family == "jumprelu":
        t = {"W_enc": get("W_enc", (d, n)), "b_enc": get("b_enc", (n,)), "W_dec": get("W_dec", (n, d)),
             "b_dec": get("b_dec", (d,)), "threshold": get("threshold", (n,))}
        if np.any(t["threshold"] < 0):
            raise InteropError(f"{path}: tensor 'threshold' has negative entries; saejax's jumprelu equals "
                               "relu(pre) * (pre > threshold) only for thresholds >= 0")
        t = common.input_bias_into_encoder(t, "b_dec", +1.0)
    elif family == "gated":
        shapes = {"decoder_bias": (d,), "encoder.weight": (n, d), "r_mag": (n,), "gate_bias": (n,),
                  "mag_bias": (n,), "decoder.weight": (d, n)}
        t = {ours: get(dl, shapes[dl]) for dl, ours in _GATED.items()}
        t["W_enc"], t["W_dec"] = t["W_enc"].T, t["W_dec"].T
    else:
        t = {"W_enc": get("encoder.weight", (n, d)).T, "b_enc": get("encoder.bias", (n,)),
             "W_dec": get("decoder.weight", (d, n)).T, "b_pre": get(bias, (d,))}
        if family != "relu":
            common.require_keys(state, ("k",), path, f"the buffer k of a {dict_class}")
            options["k"] = int(common.to_numpy(state["k"]))
        if family == "batchtopk":
            common.require_keys(state, ("threshold",), path, "the buffer threshold of a BatchTopKSAE")
            threshold = get("threshold", ())
            if threshold < 0:
                raise InteropError(f"{path}: threshold={float(threshold)} (< 0: never estimated); a BatchTopKSAE "
                                   "encodes with its threshold, so this one cannot be used for inference")
            t["threshold"] = threshold
    source = {"format": NAME, "path": os.path.abspath(src), "dict_class": dict_class,
              "hookpoint": trainer.get("submodule_name"), "model": trainer.get("lm_name")}
    return common.make_spec(family, d, n, options, t, dict(common.NO_NORMALIZATION), source, path)

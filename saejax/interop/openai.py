"""OpenAI `sparse_autoencoder`: one `torch.save`d state dict (`Autoencoder.from_state_dict`).

Keys: pre_bias (d), encoder.weight (n, d), latent_bias (n), decoder.weight
(d, n), the statistics buffers stats_last_nonzero, latents_activation_frequency,
latents_mean_square, and `activation` ("ReLU" or "TopK") with
`activation_state_dict` ({k, postact_fn} for TopK). Encoding is
activation((x - pre_bias) @ encoder.weight.T + latent_bias), decoding
latents @ decoder.weight.T + pre_bias. `from_state_dict` turns on a per-token
layer norm exactly when the activation is TopK (x - mean, divided by the
unbiased std + 1e-5, undone after decoding), so a TopK checkpoint imports as a
TopK SAE whose spec carries that layer norm, and only such an SAE exports as
TopK; saejax ReLU SAEs export as ReLU checkpoints (no layer norm).
"""

from __future__ import annotations

import os

import numpy as np

from saejax.export import LAYER_NORM
from saejax.interop import common
from saejax.interop.common import InteropError

NAME = "openai"
WEIGHTS_FILE = "ae.pt"
FAMILIES = ("relu", "topk")
_WHAT = ("an OpenAI sparse_autoencoder checkpoint is a torch.save'd Autoencoder state dict with "
         "pre_bias, encoder.weight, latent_bias, decoder.weight and activation")


def write(tensors, cfg, out: str) -> list[str]:
    family, n = cfg["family"], int(cfg["n"])
    layer_norm = (cfg.get("normalization") or {}).get("method") == LAYER_NORM
    if family == "topk" and not layer_norm:
        raise InteropError(
            "OpenAI's Autoencoder.from_state_dict layer-normalises every token of a TopK autoencoder "
            "(normalize = activation == 'TopK'), and this TopK SAE was trained on activations "
            "multiplied by one scale, not layer-normalised: the checkpoint would reconstruct "
            "different activations. Export it with --format saelens or sparsify instead")
    if family == "relu" and layer_norm:
        raise InteropError("OpenAI ReLU autoencoders take raw activations; this SAE layer-normalises "
                           "each token: export it with --format saelens instead")
    import torch

    state = common.to_torch({"pre_bias": tensors["b_pre"], "encoder.weight": tensors["W_enc"].T,
                             "latent_bias": tensors["b_enc"], "decoder.weight": tensors["W_dec"].T})
    state.update({
        "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
        "latents_activation_frequency": torch.ones(n, dtype=torch.float),
        "latents_mean_square": torch.zeros(n, dtype=torch.float),
        "activation": "TopK" if family == "topk" else "ReLU",
        "activation_state_dict": {"k": int(cfg["k"]), "postact_fn": "ReLU"} if family == "topk" else {},
    })
    common.torch_save(state, os.path.join(out, WEIGHTS_FILE))
    return [WEIGHTS_FILE]


def read(src: str):
    path = os.path.join(src, WEIGHTS_FILE) if os.path.isdir(src) else src
    state = common.torch_load(path, _WHAT)
    if not isinstance(state, dict):
        raise InteropError(f"{path}: holds a {type(state).__name__}, expected a state dict; {_WHAT}")
    common.require_keys(state, ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight"), path, _WHAT)
    activation = state.get("activation", "ReLU")
    if activation not in ("ReLU", "TopK"):
        raise InteropError(f"{path}: activation {activation!r} has no saejax family; expected 'ReLU' or 'TopK'")
    if "encoder.bias" in state or "decoder.bias" in state:
        raise InteropError(f"{path}: encoder.bias/decoder.bias are not part of OpenAI's Autoencoder "
                           "(it has pre_bias and latent_bias); expected its state dict")
    encoder = common.to_numpy(state["encoder.weight"])
    if encoder.ndim != 2:
        raise InteropError(f"{path}: tensor 'encoder.weight' has shape {encoder.shape}, expected (n_latents, d)")
    n, d = encoder.shape
    meaning = f"encoder.weight is (n_latents={n}, d={d})"
    t = {
        "W_enc": encoder.T.astype(np.float32),
        "b_enc": common.check_shape("latent_bias", common.to_numpy(state["latent_bias"]), (n,), path, meaning),
        "W_dec": common.check_shape("decoder.weight", common.to_numpy(state["decoder.weight"]), (d, n),
                                    path, meaning).T,
        "b_pre": common.check_shape("pre_bias", common.to_numpy(state["pre_bias"]), (d,), path, meaning),
    }
    options, family, normalization = {}, "relu", dict(common.NO_NORMALIZATION)
    if activation == "TopK":
        sub = state.get("activation_state_dict") or {}
        common.require_keys(sub, ("k",), path, "activation_state_dict {k, postact_fn} of a TopK autoencoder")
        if sub.get("postact_fn", "ReLU") != "ReLU":
            raise InteropError(f"{path}: TopK postact_fn {sub['postact_fn']!r} has no saejax family; "
                               "expected 'ReLU'")
        family, options = "topk", {"k": int(sub["k"])}
        normalization = {"scale": 1.0, "method": LAYER_NORM, "eps": 1e-5,
                         "convention": "OpenAI LN: (x - mean) / (std + eps) per token, std unbiased; "
                                       "reconstruction * std + mean"}
    source = {"format": NAME, "path": os.path.abspath(path), "activation": activation,
              "hookpoint": None, "model": None}
    return common.make_spec(family, d, n, options, t, normalization, source, path)

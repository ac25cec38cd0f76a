"""EleutherAI sparsify: `{hookpoint}/cfg.json` + `{hookpoint}/sae.safetensors` (`SparseCoder.load_from_disk`).

Tensors are encoder.weight (n, d), encoder.bias (n), W_dec (n, d), b_dec (d);
cfg.json has d_in, num_latents, k, activation ("topk" or "groupmax"),
normalize_decoder, multi_topk, skip_connection, transcode. sparsify encodes
topk_k(relu((x - b_dec) @ encoder.weight.T + encoder.bias)): ReLU before the
top-k, which keeps the same codes as saejax's ReLU after it (a latent with a
negative pre-activation is zero either way). Only TopK SAEs fit the format.
The directory is named by the hookpoint (`layers.L`, the output of block L).
"""

from __future__ import annotations

import os

import numpy as np

from saejax.export import LAYER_NORM, write_json_atomic
from saejax.interop import common
from saejax.interop.common import InteropError

NAME = "sparsify"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
FAMILIES = ("topk",)
_WHAT = "a sparsify SAE directory (one per hookpoint, e.g. layers.6/) holds cfg.json + sae.safetensors"


def write(tensors, cfg, out: str) -> list[str]:
    if (cfg.get("normalization") or {}).get("method") == LAYER_NORM:
        raise InteropError("sparsify SAEs take raw activations; this SAE layer-normalises each token, "
                           "which sparsify cannot express: export it with --format saelens or openai")
    hook = common.sparsify_hookpoint(common.source_hookpoint(cfg)) or "sae"
    directory = os.path.join(out, hook)
    os.makedirs(directory)
    norms = np.linalg.norm(tensors["W_dec"], axis=1)
    sparsify_cfg = {
        "activation": "topk", "expansion_factor": max(1, int(cfg["n"]) // int(cfg["d"])),
        "normalize_decoder": bool(np.allclose(norms, 1.0, atol=1e-4)), "num_latents": int(cfg["n"]),
        "k": int(cfg["k"]), "multi_topk": bool((cfg.get("options") or {}).get("multi_topk", False)),
        "skip_connection": False, "transcode": False, "d_in": int(cfg["d"]),
    }
    from safetensors.numpy import save_file

    weights = {"encoder.weight": tensors["W_enc"].T, "encoder.bias": tensors["b_enc"],
               "W_dec": tensors["W_dec"], "b_dec": tensors["b_pre"]}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()},
              os.path.join(directory, WEIGHTS_FILE))
    write_json_atomic(os.path.join(directory, CFG_FILE), sparsify_cfg)
    return [os.path.join(hook, CFG_FILE), os.path.join(hook, WEIGHTS_FILE)]


def read(src: str):
    if not os.path.isdir(src):
        raise InteropError(f"{src}: not a directory; {_WHAT}")
    if not os.path.exists(os.path.join(src, CFG_FILE)):  # a sparsify save dir with one hookpoint in it
        subdirs = [e for e in sorted(os.listdir(src)) if os.path.isfile(os.path.join(src, e, CFG_FILE))]
        if len(subdirs) == 1:
            src = os.path.join(src, subdirs[0])
        elif subdirs:
            raise InteropError(f"{src} holds SAEs for several hookpoints ({', '.join(subdirs)}); "
                               "import one of them: SRC/HOOKPOINT")
    cfg_path, weights_path = os.path.join(src, CFG_FILE), os.path.join(src, WEIGHTS_FILE)
    cfg = common.read_json(cfg_path, _WHAT)
    common.require_keys(cfg, ("d_in", "k"), cfg_path, "sparsify cfg.json fields (SparseCoder.save_to_disk)")
    if cfg.get("transcode"):
        raise InteropError(f"{cfg_path}: transcode=true: a transcoder maps one hookpoint to another, "
                           "which no saejax family represents; expected an SAE (transcode=false)")
    if cfg.get("skip_connection"):
        raise InteropError(f"{cfg_path}: skip_connection=true (a W_skip term) has no saejax equivalent; "
                           "expected skip_connection=false")
    if cfg.get("activation", "topk") != "topk":
        raise InteropError(f"{cfg_path}: activation {cfg['activation']!r} has no saejax family; "
                           "expected 'topk'")
    raw = common.load_safetensors(weights_path, _WHAT)
    common.require_keys(raw, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), weights_path,
                        "the tensors of a sparsify SAE")
    d = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or raw["encoder.weight"].shape[0])
    meaning = f"cfg.json has d_in={d}, num_latents={n}"
    t = {
        "W_enc": common.check_shape("encoder.weight", raw["encoder.weight"], (n, d), weights_path, meaning).T,
        "b_enc": common.check_shape("encoder.bias", raw["encoder.bias"], (n,), weights_path, meaning),
        "W_dec": common.check_shape("W_dec", raw["W_dec"], (n, d), weights_path, meaning),
        "b_pre": common.check_shape("b_dec", raw["b_dec"], (d,), weights_path, meaning),
    }
    hook = os.path.basename(os.path.normpath(src))
    source = {"format": NAME, "path": os.path.abspath(src), "hookpoint": hook, "model": None,
              "multi_topk": bool(cfg.get("multi_topk", False))}
    return common.make_spec("topk", d, n, {"k": int(cfg["k"])}, t, dict(common.NO_NORMALIZATION), source,
                            weights_path)

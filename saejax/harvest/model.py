"""Loading the Hugging Face model and tokenizer to harvest from (PyTorch)."""

from __future__ import annotations

import importlib
import os
from typing import Any

from saejax.errors import ConfigError

INSTALL_HINT = ("harvesting needs PyTorch and transformers: pip install 'saejax[harvest]' "
                "(on a CPU-only machine add `-c constraints-cpu.txt` so pip takes the CPU build of torch)")


def import_torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    transformers.utils.logging.set_verbosity_error()  # e.g. "sequence longer than the model's maximum" when tokenising documents
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def resolve_model_path(name: str) -> str:
    """`package:MODULE` is a model shipped inside a Python package (MODULE.get_model_path())."""
    if not name.startswith("package:"):
        return os.path.expanduser(name) if os.path.isdir(os.path.expanduser(name)) else name
    module_name = name.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(f"model.name={name!r}: the package {module_name!r} is not installed "
                          f"(pip install {module_name.replace('_', '-')}, or pip install 'saejax[harvest]')") from None
    if not hasattr(module, "get_model_path"):
        raise ConfigError(f"model.name={name!r}: {module_name} has no get_model_path()")
    return str(module.get_model_path())


def device_of(config) -> str:
    torch, _ = import_torch()
    if config.model.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.model.device


def load(config) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode on its device, tokenizer, facts for the ledger)."""
    torch, transformers = import_torch()
    path = resolve_model_path(config.model.name)
    kwargs = {"revision": config.model.revision or None, "trust_remote_code": config.model.trust_remote_code,
              "local_files_only": os.path.isdir(path)}  # a local model never touches the Hub
    model_class = transformers.AutoModelForCausalLM if config.model.kind == "causal_lm" else transformers.AutoModel
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
        model = model_class.from_pretrained(path, dtype=getattr(torch, config.model.dtype), **kwargs)
    except (OSError, ValueError) as e:
        offline = " (no Hub access: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(f"cannot load model {config.model.name!r}{offline}: {e}. Give a Hub name, a local directory "
                          "with config.json and weights, or package:MODULE") from None
    device = device_of(config)
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"model.device={config.model.device!r} is not usable here: {e}") from None
    facts = {
        "name": config.model.name,
        "path": path,
        "class": type(model).__name__,
        "revision": config.model.revision or None,
        "commit_hash": getattr(model.config, "_commit_hash", None),
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "max_positions": max_positions(model, tokenizer),
        "device": device,
        "dtype": config.model.dtype,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    return model, tokenizer, facts


def max_positions(model, tokenizer) -> int | None:
    """The longest context the model accepts, where it says."""
    limits = [getattr(model.config, key, None) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 10**8:
        limits.append(model_max)
    return min(limits) if limits else None

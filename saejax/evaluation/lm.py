"""The language model a store was harvested from, with its hookpoint's activation replaceable.

`LanguageModel.forward(ids, keep, replacement)` runs the causal LM on whole
contexts and, when `replacement` is given, puts those rows in place of the
hookpoint's activation at the kept positions (the positions the store holds;
special tokens the store left out stay clean). The replacement happens on the
very module the harvest hooked (`saejax.harvest.hookpoints`), so what is
spliced is exactly what was stored: `resid_post.L` is block L's output, not
transformers' `hidden_states[L + 1]` after a final norm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saejax.errors import ConfigError
from saejax.harvest import hookpoints
from saejax.harvest import model as model_io


def _target(model, hookpoint: str):
    """The module to hook and whether to replace its input, resolved on the LM with its head.

    `resid_*` names resolve on the base model (the store may have been harvested
    without the head: `AutoModel`); `module:NAME` is tried on the model with
    its head first, then on the base model.
    """
    if hookpoint.startswith("module:"):
        name = hookpoint.split(":", 1)[1]
        for root in (model, model.base_model):
            try:
                return root.get_submodule(name), False
            except AttributeError:
                continue
        raise ConfigError(f"hookpoint {hookpoint!r}: {type(model).__name__} has no submodule {name!r}; "
                          "the model is not the one the store was harvested from")
    hook = hookpoints.resolve(model.base_model, hookpoint)
    return model.base_model.get_submodule(hook.module_name), hook.before


class LanguageModel:
    """A causal LM (PyTorch, eval mode), its tokenizer and the hookpoint of a store."""

    def __init__(self, model, tokenizer, hookpoint: str, device: str, facts: dict[str, Any]):
        self.model, self.tokenizer, self.hookpoint = model, tokenizer, hookpoint
        self.device, self.facts = device, facts
        self.module, self.before = _target(model, hookpoint)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    @classmethod
    def load(cls, harvest_config, hookpoint: str) -> "LanguageModel":
        model, tokenizer, facts = model_io.load(harvest_config, causal_lm=True)
        return cls(model, tokenizer, hookpoint, facts["device"], facts)

    def forward(self, ids: np.ndarray, keep: np.ndarray | None = None, replacement: np.ndarray | None = None,
                capture: bool = False):
        """Logits (contexts, positions, vocab) float32 torch, and the clean hookpoint rows if `capture`.

        `replacement` (rows, d) goes in place of the hookpoint's activation at
        `keep` (contexts, positions), in row-major order of the kept positions.
        """
        import torch

        ids_t = torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
        keep_t = None if keep is None else torch.from_numpy(np.asarray(keep, bool)).to(self.device)
        captured: dict[str, Any] = {}

        def swap(value):
            if capture:
                captured["rows"] = value[keep_t].detach().to(torch.float32).cpu().numpy()
            if replacement is None:
                return value
            rows = torch.from_numpy(np.array(replacement, np.float32)).to(value.device, value.dtype)
            if rows.shape != (int(keep_t.sum()), value.shape[-1]):
                raise ValueError(f"replacement has shape {tuple(rows.shape)}, expected "
                                 f"({int(keep_t.sum())}, {value.shape[-1]}) (kept positions, d)")
            value = value.clone()
            value[keep_t] = rows
            return value

        def pre_hook(_module, args, kwargs):
            if args:
                return (swap(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": swap(kwargs["hidden_states"])}

        def hook(_module, _args, output):
            if isinstance(output, (tuple, list)):
                return (swap(output[0]),) + tuple(output[1:])
            return swap(output)

        handle = (self.module.register_forward_pre_hook(pre_hook, with_kwargs=True) if self.before
                  else self.module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits = self.model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).logits
        finally:
            handle.remove()
        logits = logits.to(torch.float32)
        return (logits, captured.get("rows")) if capture else logits

    def capture(self, ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """The clean hookpoint rows (kept positions, d), without running the layers after it."""
        return _capture_rows(self, ids, keep)


class _Stop(Exception):
    pass


def _capture_rows(lm: "LanguageModel", ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Clean hookpoint rows at `keep`, stopping the forward pass there (later layers cost nothing)."""
    import torch

    ids_t = torch.from_numpy(np.asarray(ids, np.int64)).to(lm.device)
    keep_t = torch.from_numpy(np.asarray(keep, bool)).to(lm.device)
    captured = {}

    def take(value):
        captured["rows"] = value[keep_t].detach().to(torch.float32).cpu().numpy()
        raise _Stop

    handle = (lm.module.register_forward_pre_hook(
        lambda _m, args, kwargs: take(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        if lm.before else lm.module.register_forward_hook(
            lambda _m, _a, output: take(output[0] if isinstance(output, (tuple, list)) else output)))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t))
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["rows"]


def next_token_losses(logits, ids: np.ndarray):
    """Per-prediction cross-entropy (contexts, positions - 1) in nats, as float64 numpy."""
    import torch

    targets = torch.from_numpy(np.asarray(ids, np.int64)[:, 1:]).to(logits.device)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    return (-log_probs.gather(-1, targets[..., None])[..., 0]).double().cpu().numpy()


def kl_divergence(clean_logits, other_logits):
    """KL(clean || other) per prediction (contexts, positions - 1), nats, float64 numpy."""
    import torch

    clean = torch.log_softmax(clean_logits[:, :-1], dim=-1)
    other = torch.log_softmax(other_logits[:, :-1], dim=-1)
    return (clean.exp() * (clean - other)).sum(-1).double().cpu().numpy()

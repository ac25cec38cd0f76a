"""Named hookpoints, resolved on the model's own modules, and their capture.

  resid_pre.L    input of transformer block L (0-indexed): the residual stream before block L
  resid_post.L   output of transformer block L: the residual stream after block L
  module:NAME    output of any submodule (first element when it returns a tuple)

`resid_post.L` is transformers' `hidden_states[L + 1]` and `resid_pre.L` is
`hidden_states[L]`, with one exception that has burnt users of other
libraries: for the last block, models with a final norm inside the base model
(GPT-2's `ln_f`, Llama's `norm`) put the *normed* stream in `hidden_states[-1]`.
Hooks on the blocks avoid the ambiguity; the convention is written into the
store's ledger. The forward pass stops once the hookpoint has been captured,
so later layers cost nothing.
"""

from __future__ import annotations

import dataclasses
import re

from saejax.errors import ConfigError

BLOCK_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")


class _Captured(Exception):
    """Raised from the hook to stop the forward pass."""


@dataclasses.dataclass
class Hookpoint:
    name: str
    module_name: str
    before: bool  # capture the module's input instead of its output
    convention: str

    def capture(self, model, **inputs):
        """Run the model until the hookpoint; returns its tensor (batch, positions, d)."""
        import torch

        module = model.get_submodule(self.module_name)
        captured = {}

        def pre_hook(_module, args, kwargs):
            captured["value"] = args[0] if args else kwargs["hidden_states"]
            raise _Captured

        def hook(_module, _args, output):
            captured["value"] = output[0] if isinstance(output, (tuple, list)) else output
            raise _Captured

        handle = (module.register_forward_pre_hook(pre_hook, with_kwargs=True) if self.before
                  else module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(**inputs)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "value" not in captured:
            raise ConfigError(f"hookpoint {self.name!r} ({self.module_name}) was not reached by the forward pass")
        return captured["value"]


def find_blocks(model) -> tuple[str, int]:
    """The name and length of the model's list of transformer blocks."""
    import torch

    num_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [(name, len(module)) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.ModuleList) and len(module) > 0
                  and (num_layers is None or len(module) == num_layers)]
    named = [c for c in candidates if c[0].split(".")[-1] in BLOCK_LIST_NAMES]
    chosen = named or candidates
    if len(chosen) != 1:
        raise ConfigError(
            f"cannot tell which module list of {type(model).__name__} holds its transformer blocks "
            f"(candidates: {[c[0] for c in candidates] or 'none'}); name the hookpoint as module:NAME instead"
        )
    return chosen[0]


def resolve(model, hookpoint: str) -> Hookpoint:
    """Check `hookpoint` against the model and describe what it captures."""
    if hookpoint.startswith("module:"):
        module_name = hookpoint.split(":", 1)[1]
        try:
            model.get_submodule(module_name)
        except AttributeError:
            close = [n for n, _ in model.named_modules() if n and (module_name in n or n in module_name)][:5]
            raise ConfigError(f"hookpoint {hookpoint!r}: {type(model).__name__} has no submodule {module_name!r}"
                              + (f"; similar: {', '.join(close)}" if close else "")) from None
        return Hookpoint(hookpoint, module_name, False,
                         f"output of submodule {module_name} (first element if it returns a tuple)")
    match = re.fullmatch(r"resid_(pre|post)\.(\d+)", hookpoint)
    blocks, num_blocks = find_blocks(model)
    usage = (f"use resid_pre.L or resid_post.L with L in 0..{num_blocks - 1} (the {num_blocks} blocks at "
             f"{blocks}), or module:NAME for any submodule")
    if not match:
        raise ConfigError(f"hookpoint {hookpoint!r} is not a hookpoint name; {usage}")
    where, layer = match.group(1), int(match.group(2))
    if layer >= num_blocks:
        raise ConfigError(f"hookpoint {hookpoint!r}: {type(model).__name__} has only {num_blocks} blocks; {usage}")
    if where == "pre":
        convention = (f"input of block {layer} of {num_blocks} ({blocks}.{layer}), the residual stream before it; "
                      f"= transformers hidden_states[{layer}]")
        return Hookpoint(hookpoint, f"{blocks}.{layer}", True, convention)
    if layer == num_blocks - 1:
        equals = ("before any final norm; transformers' hidden_states[-1] adds the final norm in models that have one "
                  "(e.g. GPT-2's ln_f), so it equals this only in models without one")
    else:
        equals = f"= transformers hidden_states[{layer + 1}]"
    convention = f"output of block {layer} of {num_blocks} ({blocks}.{layer}), the residual stream after it; {equals}"
    return Hookpoint(hookpoint, f"{blocks}.{layer}", False, convention)

"""The evaluator interface: one metric family per file, chosen and configured by name.

Each evaluator owns its config group `eval.<name>` (its `defaults()`, with
`enabled`), says whether it applies to a run (`skip_reason`), and computes
its figures from `EvalInputs`, which loads what evaluators share (the SAE,
the held-out activations, the language model and held-out contexts) once,
on first use.
"""

from __future__ import annotations

from typing import Any

from saejax.evaluation.inputs import EvalInputs


class Evaluator:
    name: str = ""
    description: str = ""
    needs_lm_head: bool = False  # skipped with a note when the model has no causal LM head
    needs_model: bool = False  # needs the model the store was harvested from (held-out contexts)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """This evaluator's keys (eval.<name>.*) and their defaults; `enabled` is added for every one."""
        return {}

    @classmethod
    def check(cls, options, config) -> list[str]:
        """Problems with the options, as messages naming the key."""
        return []

    def skip_reason(self, inputs: EvalInputs) -> str | None:
        """Why this evaluator cannot run on this run (a note in eval.json), or None."""
        if self.needs_model:
            return inputs.model_problem(needs_head=self.needs_lm_head)
        return None

    def run(self, inputs: EvalInputs, options) -> dict[str, Any]:
        raise NotImplementedError

    def headline(self, figures: dict[str, Any]) -> dict[str, Any]:
        """The figures copied into results.json's `eval_metrics` and the sweep table."""
        return {}

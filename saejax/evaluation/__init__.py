"""`saejax eval RUN_DIR`: every evaluation metric of a trained SAE, through its inference encode/decode.

Evaluators are chosen and configured by name under `eval.<name>` (each file
owns its keys); `saejax.evaluation.run.evaluate_run` runs the enabled ones,
writes `eval.json` and copies the headline figures into results.json.
"""

from __future__ import annotations

from saejax.evaluation.ablation import AblationSparsity
from saejax.evaluation.base import Evaluator
from saejax.evaluation.downstream import Downstream
from saejax.evaluation.explain import Explainability
from saejax.evaluation.feature_entropy import FeatureEntropy
from saejax.evaluation.probes import Probes
from saejax.evaluation.reconstruction import Reconstruction

EVALUATORS: dict[str, type[Evaluator]] = {e.name: e for e in (
    Reconstruction,
    Downstream,
    Probes,
    AblationSparsity,
    Explainability,
    FeatureEntropy,
)}

__all__ = ["EVALUATORS", "Evaluator"]

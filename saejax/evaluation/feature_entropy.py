"""Feature-set entropy on held-out tokens (saejax.entropy): the bits of the set of latents they fire.

Over eval.feature_entropy.tokens held-out tokens as one set, and as the mean over batches of
eval.feature_entropy.batch tokens (the minibatch figure a BAE is trained on, which is smaller:
fewer tokens leave fewer latents half on).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from saejax.entropy import entropy_from_counts
from saejax.evaluation.base import Evaluator
from saejax.evaluation.reconstruction import fire_counts


class FeatureEntropy(Evaluator):
    name = "feature_entropy"
    description = "entropy (bits) of the set of latents held-out tokens fire, over all of them and per batch"

    @classmethod
    def defaults(cls):
        return {"tokens": 16384, "batch": 512}

    @classmethod
    def check(cls, options, config):
        problems = []
        for key in ("tokens", "batch"):
            if options[key] < 1:
                problems.append(f"eval.feature_entropy.{key}={options[key]} must be >= 1")
        return problems

    def run(self, inputs, options) -> dict[str, Any]:
        sae = inputs.sae
        threshold = float(inputs.config.sae.fire_threshold)
        size = int(options.batch)
        counts, tokens, per_batch = np.zeros(sae.n, np.int64), 0, []
        for raw in inputs.heldout_rows(int(options.tokens)):
            x = np.asarray(raw, np.float32) * np.float32(sae.scale)
            codes = sae.encode(x, normalized=True)  # the shapes reconstruction's evaluator compiled
            for start in range(0, x.shape[0] - size + 1, size):
                rows = {f.name: getattr(codes, f.name)[start:start + size] for f in dataclasses.fields(codes)}
                batch_counts = fire_counts(dataclasses.replace(codes, **rows), sae.n, threshold)
                per_batch.append(entropy_from_counts(batch_counts, size))
                counts += batch_counts
                tokens += size
        if not tokens:
            return {"tokens": 0, "note": f"fewer held-out tokens than one batch of {size}"}
        bits = entropy_from_counts(counts, tokens)
        return {"tokens": tokens, "entropy_bits": bits, "entropy_bits_per_latent": bits / sae.n,
                "batch": size, "batches": len(per_batch), "batch_entropy_bits": float(np.mean(per_batch))}

    def headline(self, figures):
        if "entropy_bits" not in figures:
            return {}
        return {"feature_entropy_bits": figures["entropy_bits"],
                "batch_feature_entropy_bits": figures["batch_entropy_bits"]}

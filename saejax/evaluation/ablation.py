"""Ablation sparsity (Gao et al. 2024, sec. 4.5): how concentrated one latent's downstream effect is.

For a sample of latents, each is ablated at one held-out token where it fires
(its code set to 0 there, everything else as the SAE reconstructs it), and
the change of the LM's logits against the unablated reconstruction is taken
at that position and every later one of the context, where a causal LM can
feel it: Δ (positions, vocab). Its sparsity is

    (Σ|Δ|)² / ΣΔ²  divided by the number of entries (positions x vocabulary size),

1 when the effect spreads evenly over every logit, m/(V·P) when it falls on m
of them: lower is sparser. `ablation_sparsity` is the mean over the sampled
latents.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from saejax.evaluation.base import Evaluator
from saejax.evaluation.probes import sparse_codes


def effect_sparsity(delta: np.ndarray) -> float:
    """(Σ|Δ|)² / ΣΔ² / Δ.size of a logit-change array; NaN when Δ is all zero."""
    delta = np.asarray(delta, np.float64)
    square = float(np.sum(delta * delta))
    if square == 0.0:
        return float("nan")
    return float(np.sum(np.abs(delta)) ** 2 / square / delta.size)


def without_latent(codes, token: int, latent: int):
    """A copy of `codes` (numpy SparseCodes/DenseCodes) with `latent` zeroed on row `token`."""
    from saejax.models.base import DenseCodes

    values = np.array(codes.values, copy=True)
    if isinstance(codes, DenseCodes):
        values[token, latent] = 0
        return DenseCodes(values)
    values[token][np.asarray(codes.indices)[token] == latent] = 0
    return dataclasses.replace(codes, values=values)


class AblationSparsity(Evaluator):
    name = "ablation"
    description = "sparsity of one latent's effect on the logits, (Σ|Δ|)²/ΣΔ² per entry"
    needs_model = True
    needs_lm_head = True

    @classmethod
    def defaults(cls):
        return {"latents": 16, "seed": 0}

    @classmethod
    def check(cls, options, config):
        return [] if options.latents >= 1 else [f"eval.ablation.latents={options.latents} must be >= 1"]

    def run(self, inputs, options) -> dict[str, Any]:
        from tqdm.auto import tqdm

        held = inputs.contexts(int(inputs.config.eval.contexts))
        sae, lm = inputs.sae, inputs.lm
        offsets = np.concatenate([[0], np.cumsum(held.keep.sum(axis=1))])
        token_of, latent_of, value_of = sparse_codes(sae, held.rows)
        fired = value_of > float(inputs.config.sae.fire_threshold)
        token_of, latent_of = token_of[fired], latent_of[fired]
        firing = np.unique(latent_of)
        if firing.size == 0:
            return {"latents": [], "ablation_sparsity": None, "note": "no latent fires on the held-out contexts"}
        rng = np.random.default_rng(int(options.seed))
        chosen = rng.choice(firing, size=min(int(options.latents), firing.size), replace=False)
        results = []
        for latent in tqdm(chosen, desc="eval: ablation", unit="latent", disable=not inputs.progress, leave=False):
            tokens = token_of[latent_of == latent]
            token = int(rng.choice(tokens))
            context = int(held.context_rows[token])
            lo, hi = offsets[context], offsets[context + 1]
            local = sae.encode(held.rows[lo:hi])
            base = sae.decode(local)
            ablated = sae.decode(without_latent(local, token - lo, int(latent)))
            ids, keep = held.ids[context:context + 1], held.keep[context:context + 1]
            delta = (lm.forward(ids, keep, ablated) - lm.forward(ids, keep, base))[0].double().cpu().numpy()
            position = int(held.positions[token])
            results.append({"latent": int(latent), "context": context + held.first_index, "position": position,
                            "sparsity": effect_sparsity(delta[position:])})
        values = [r["sparsity"] for r in results if np.isfinite(r["sparsity"])]
        return {"latents": results, "ablation_sparsity": float(np.mean(values)) if values else None,
                "vocabulary_size": lm.vocab_size}

    def headline(self, figures):
        return {"ablation_sparsity": figures["ablation_sparsity"]}

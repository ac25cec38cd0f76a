"""Explainability by Gao et al.'s n-gram baseline: how well the best simple explanation predicts a latent.

For a sample of latents that fire on the fit half of the held-out tokens
(even contexts), the candidate explanations are the unigrams (this token)
and bigrams (previous token, this token) at its `top` most active tokens
there. Each candidate predicts "fires" wherever its n-gram occurs; the one
with the best F1 against where the latent really fires on the fit half is
the latent's explanation, and it is scored on the held-out half (odd
contexts): precision, recall, F1. No LLM is involved. `explain_f1` is the
mean held-out F1 over the sampled latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saejax.evaluation.base import Evaluator
from saejax.evaluation.probes import sparse_codes


def ngram_keys(held) -> tuple[np.ndarray, np.ndarray]:
    """(unigram key, bigram key) per token; bigram -1 at a context's first position."""
    previous = np.full(held.token_ids.shape, -1, np.int64)
    within = held.positions > 0
    previous[within] = held.ids[held.context_rows[within], held.positions[within] - 1]
    vocab = int(max(held.ids.max(), 0)) + 1
    unigram = held.token_ids.astype(np.int64)
    bigram = np.where(previous >= 0, previous * vocab + unigram, -1)
    return unigram, bigram


def _scores(predicted: np.ndarray, fires: np.ndarray) -> dict[str, float]:
    hits = float(np.sum(predicted & fires))
    precision = hits / max(float(predicted.sum()), 1.0)
    recall = hits / max(float(fires.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def explain_latent(activation: np.ndarray, unigram: np.ndarray, bigram: np.ndarray, fit: np.ndarray,
                   top: int, threshold: float) -> dict[str, Any]:
    """The best n-gram explanation of one latent (activation per token), fitted on `fit`, scored on ~fit."""
    fires = activation > threshold
    fit_rows = np.flatnonzero(fit & fires)
    best_rows = fit_rows[np.argsort(-activation[fit_rows], kind="stable")[:top]]
    candidates = [("unigram", int(k)) for k in np.unique(unigram[best_rows])]
    candidates += [("bigram", int(k)) for k in np.unique(bigram[best_rows]) if k >= 0]
    best, best_f1 = None, -1.0
    for kind, key in candidates:
        occurs = (unigram if kind == "unigram" else bigram) == key
        f1 = _scores(occurs[fit], fires[fit])["f1"]
        if f1 > best_f1:
            best, best_f1 = (kind, key), f1
    kind, key = best
    occurs = (unigram if kind == "unigram" else bigram) == key
    return {"kind": kind, "key": key, "fit_f1": best_f1, **_scores(occurs[~fit], fires[~fit])}


class Explainability(Evaluator):
    name = "explain"
    description = "held-out F1 of the best unigram/bigram explanation of a latent"
    needs_model = True

    @classmethod
    def defaults(cls):
        return {"latents": 64, "top": 32, "min_fires": 4, "seed": 0}

    @classmethod
    def check(cls, options, config):
        return [f"eval.explain.{key}={options[key]} must be >= 1"
                for key in ("latents", "top", "min_fires") if options[key] < 1]

    def run(self, inputs, options) -> dict[str, Any]:
        held = inputs.contexts(int(inputs.config.eval.contexts))
        sae = inputs.sae
        threshold = float(inputs.config.sae.fire_threshold)
        token, latent, value = sparse_codes(sae, held.rows)
        fit = held.split()
        fired = value > threshold
        fit_fires = np.bincount(latent[fired & fit[token]], minlength=sae.n)
        eligible = np.flatnonzero(fit_fires >= int(options.min_fires))
        if eligible.size == 0:
            return {"latents": [], "explain_f1": None,
                    "note": f"no latent fires on {options.min_fires}+ tokens of the fit half"}
        rng = np.random.default_rng(int(options.seed))
        chosen = np.sort(rng.choice(eligible, size=min(int(options.latents), eligible.size), replace=False))
        unigram, bigram = ngram_keys(held)
        vocab = int(max(held.ids.max(), 0)) + 1
        tokenizer = inputs.tokenizer
        results = []
        for j in chosen:
            activation = np.zeros(held.token_ids.size)
            mine = latent == j
            activation[token[mine]] = value[mine]
            found = explain_latent(activation, unigram, bigram, fit, int(options.top), threshold)
            ids = [found["key"]] if found["kind"] == "unigram" else [found["key"] // vocab, found["key"] % vocab]
            results.append({"latent": int(j), "ngram": tokenizer.convert_ids_to_tokens(ids),
                            **{k: found[k] for k in ("kind", "fit_f1", "precision", "recall", "f1")}})
        return {"latents": results, "explain_f1": float(np.mean([r["f1"] for r in results])),
                "explain_precision": float(np.mean([r["precision"] for r in results])),
                "explain_recall": float(np.mean([r["recall"] for r in results]))}

    def headline(self, figures):
        return {"explain_f1": figures["explain_f1"]}

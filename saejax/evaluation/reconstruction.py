"""Reconstruction on held-out tokens: nmse/FVU, explained variance, L0, dead/dense, firing density.

Through the exported SAE's inference encode/decode, on the run's eval split
(`data.eval_fraction`). Firing density: the fraction of these tokens on
which each latent fires (code > sae.fire_threshold), as a log10 histogram
(never-firing latents counted apart) and a plot, `eval_density.png`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saejax.evaluation.base import Evaluator

HISTOGRAM_BINS = np.arange(-8.0, 0.25, 0.25)  # log10 firing frequency


def fire_counts(codes, n: int, threshold: float) -> np.ndarray:
    """(n,) on how many tokens each latent's code exceeds `threshold` (sparse or dense codes)."""
    from saejax.models.base import DenseCodes

    values = np.asarray(codes.values)
    if isinstance(codes, DenseCodes):
        return np.sum(values > threshold, axis=0)
    return np.bincount(np.asarray(codes.indices).reshape(-1), weights=(values > threshold).reshape(-1),
                       minlength=n).astype(np.int64)


def active_count(codes) -> np.ndarray:
    return np.sum(np.asarray(codes.values) != 0, axis=-1)


def density_histogram(counts: np.ndarray, tokens: int) -> dict[str, Any]:
    """log10(fraction of tokens fired on) of the latents that fired, binned; dead ones counted apart."""
    fired = counts[counts > 0]
    histogram, edges = np.histogram(np.log10(fired / tokens), bins=HISTOGRAM_BINS)
    return {"log10_frequency_edges": edges.tolist(), "latents": histogram.tolist(),
            "never_fired": int(np.sum(counts == 0)), "tokens": int(tokens)}


def plot_density(histogram: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(histogram["log10_frequency_edges"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(edges[:-1], histogram["latents"], width=np.diff(edges), align="edge", color="#4878a8")
    ax.set_xlabel("log10 firing frequency on held-out tokens")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({histogram['never_fired']} never fired on {histogram['tokens']:,} tokens)",
                 fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    import os

    os.replace(tmp, path)


class Reconstruction(Evaluator):
    name = "reconstruction"
    description = "held-out nmse, explained variance, L0, dead/dense fractions, firing-density histogram"

    @classmethod
    def defaults(cls):
        return {"tokens": 16384, "plot": True}

    @classmethod
    def check(cls, options, config):
        return [] if options.tokens >= 1 else [f"eval.reconstruction.tokens={options.tokens} must be >= 1"]

    def run(self, inputs, options) -> dict[str, Any]:
        sae = inputs.sae
        threshold = float(inputs.config.sae.fire_threshold)
        counts = np.zeros(sae.n, np.int64)
        err, total, l0, tokens = 0.0, 0.0, 0.0, 0
        for raw in inputs.heldout_rows(int(options.tokens)):
            x = np.asarray(raw, np.float32) * np.float32(sae.scale)  # the units the SAE trained in
            codes = sae.encode(x, normalized=True)
            recon = sae.decode(codes, normalized=True)
            err += float(np.sum((recon.astype(np.float64) - x) ** 2))
            centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
            total += float(np.sum(centred ** 2))
            l0 += float(active_count(codes).sum())
            counts += fire_counts(codes, sae.n, threshold)
            tokens += x.shape[0]
        dense_threshold = float(inputs.config.sae.dense_threshold)
        figures = {
            "tokens": tokens,
            # nmse as in training: sum ||x - x_hat||^2 / sum ||x - batch mean||^2 (FVU)
            "nmse": err / total,
            "explained_variance": 1.0 - err / total,
            "l0": l0 / tokens,
            "dead_fraction": float(np.mean(counts == 0)),
            "dense_fraction": float(np.mean(counts > dense_threshold * tokens)),
            "density_histogram": density_histogram(counts, tokens),
        }
        source = inputs.source
        if hasattr(source, "feature_recovery"):
            figures["feature_recovery_mmcs"] = source.feature_recovery(
                np.asarray(sae.family.dictionary(sae.params)))
        if options.plot:
            import os

            path = os.path.join(inputs.run_dir, "eval_density.png")
            plot_density(figures["density_histogram"], path, f"{sae.family.name} n={sae.n}")
            figures["plot"] = path
        return figures

    def headline(self, figures):
        # results.json's eval_metrics already hold the trainer's held-out nmse, L0, dead and dense
        # fractions (over train.eval_batches); these, over eval.reconstruction.tokens, stay in eval.json.
        return {}

"""Feature-set entropy (Cho et al. 2025, "Binary Autoencoder ...", the paper's first use of BAE).

The entropy of the set of features a batch of tokens fires: each latent j is a binary variable
(fired on a token or not: code > sae.fire_threshold), p_j the fraction of the tokens on which it
fires, and

    H = sum_j H_b(p_j) bits,   H_b(p) = -p log2 p - (1 - p) log2 (1 - p)   (0 log 0 = 0).

This is the reference code's `entropy_eval` (hc495/Binary_Autoencoder, train/training_objective.py)
without its 1e-10 inside the logs: the joint entropy of the n binary features if they were
independent, an upper bound on their joint entropy that BAE's training (minimal minibatch entropy,
optionally decorrelated codes) pushes towards tightness. It grows with the number of latents that
fire on some but not all tokens; a latent that never (or always) fires adds 0.

    from saejax.export import load_sae
    from saejax.entropy import entropy
    entropy(load_sae("runs/bae"), activations)   # bits, for a (tokens, d) array of raw activations

Any family's codes can be measured (fired = code > threshold), but only a BAE is trained to make
the estimate meaningful. The figure depends on the tokens given (their number and mix), so compare
entropies over the same tokens.
"""

from __future__ import annotations

import numpy as np


def bernoulli_bits(p: np.ndarray) -> np.ndarray:
    """H_b(p) in bits, elementwise, with 0 log 0 = 0."""
    p = np.asarray(p, np.float64)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0) + np.where(q > 0, -q * np.log2(q), 0.0)
    return terms


def entropy_from_counts(counts: np.ndarray, tokens: int) -> float:
    """sum_j H_b(counts_j / tokens): the feature-set entropy from per-latent firing counts."""
    if tokens <= 0:
        raise ValueError(f"the entropy of a set of {tokens} tokens is not defined; give at least one token")
    return float(np.sum(bernoulli_bits(np.asarray(counts, np.float64) / tokens)))


def fired_counts(sae, x, normalized: bool = False, rows: int = 4096) -> np.ndarray:
    """(n,) int64: on how many of the (tokens, d) activations `x` each latent fires."""
    from saejax.evaluation.reconstruction import fire_counts

    threshold = float(sae.family.fire_threshold)
    counts = np.zeros(sae.n, np.int64)
    x = np.asarray(x, np.float32)
    for start in range(0, x.shape[0], rows):  # bounded (rows, n) codes at a time
        counts += fire_counts(sae.encode(x[start:start + rows], normalized), sae.n, threshold)
    return counts


def entropy(sae, x, normalized: bool = False) -> float:
    """Feature-set entropy in bits of the latents `sae` fires on the tokens `x` (module docstring).

    `sae` is what `saejax.export.load_sae` returns; `x` (tokens, d) raw activations (or already
    normalised ones with normalized=True).
    """
    x = np.asarray(x, np.float32)
    return entropy_from_counts(fired_counts(sae, x, normalized), x.shape[0])

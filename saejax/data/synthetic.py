"""Synthetic activations built from a known sparse dictionary.

x = sum_i a_i f_i + noise, with unit-norm true features f_i (random, from
`dictionary_seed`), feature i active with probability p_i ~ (i+1)^-exponent
(scaled so that sum_i p_i = avg_active), active coefficients a_i ~ U[min, max].
Since the true dictionary is known, `feature_recovery` measures how well an
SAE found it.
"""

from __future__ import annotations

import numpy as np

from saejax.data.source import DataSource

_STREAM = {"train": 0, "eval": 1, "sample": 2}


def firing_probabilities(num_features: int, avg_active: float, exponent: float) -> np.ndarray:
    """Power-law probabilities summing to avg_active, each at most 1 (clipped mass goes to the rest)."""
    weights = (np.arange(num_features) + 1.0) ** -exponent
    p = avg_active * weights / weights.sum()
    while (p > 1.0).any():
        over = p > 1.0
        excess = (p[over] - 1.0).sum()
        p[over] = 1.0
        free = p < 1.0
        p[free] += excess * weights[free] / weights[free].sum()
    return p


class SyntheticSource(DataSource):
    def __init__(self, d: int, num_features: int, avg_active: float, power_law_exponent: float,
                 min_magnitude: float, max_magnitude: float, noise_std: float, dictionary_seed: int, seed: int):
        self.d = int(d)
        self.num_features = int(num_features)
        self.min_magnitude, self.max_magnitude = float(min_magnitude), float(max_magnitude)
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.params = dict(num_features=num_features, avg_active=avg_active, power_law_exponent=power_law_exponent,
                           min_magnitude=min_magnitude, max_magnitude=max_magnitude, noise_std=noise_std,
                           dictionary_seed=dictionary_seed)
        rng = np.random.default_rng(dictionary_seed)
        features = rng.standard_normal((self.num_features, self.d))
        self.dictionary = (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)
        self.probabilities = firing_probabilities(self.num_features, avg_active, power_law_exponent).astype(np.float32)

    @classmethod
    def from_config(cls, config) -> "SyntheticSource":
        s = config.data.synthetic
        return cls(config.sae.d, s.num_features, s.avg_active, s.power_law_exponent, s.min_magnitude,
                   s.max_magnitude, s.noise_std, s.dictionary_seed, config.seed)

    def _generate(self, stream: int, index: int, num_rows: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, index])
        active = rng.random((num_rows, self.num_features), dtype=np.float32) < self.probabilities
        magnitudes = rng.uniform(self.min_magnitude, self.max_magnitude, (num_rows, self.num_features)).astype(np.float32)
        x = (active * magnitudes) @ self.dictionary
        if self.noise_std:
            x += self.noise_std * rng.standard_normal((num_rows, self.d), dtype=np.float32)
        return x

    def rows(self, step, batch_size, split, start, stop):
        # The whole global batch is generated (cheap) so that any split of it
        # over processes gives the same rows.
        return self._generate(_STREAM[split], step, batch_size)[start:stop]

    def sample(self, num_rows):
        return self._generate(_STREAM["sample"], 0, num_rows)

    def describe(self):
        return f"synthetic(d={self.d}, features={self.num_features}, seed={self.seed})"

    def metadata(self):
        return {**super().metadata(), "synthetic": self.params}

    def feature_recovery(self, learned: np.ndarray) -> float:
        """Mean over true features of the best cosine similarity with a learned dictionary row."""
        return mean_max_cosine(self.dictionary, learned)


def mean_max_cosine(true_dictionary: np.ndarray, learned: np.ndarray) -> float:
    """mean_i max_j cos(true_i, learned_j) for row dictionaries (F, d) and (n, d)."""
    t = true_dictionary / np.maximum(np.linalg.norm(true_dictionary, axis=1, keepdims=True), 1e-12)
    l = np.asarray(learned, np.float32)
    l = l / np.maximum(np.linalg.norm(l, axis=1, keepdims=True), 1e-12)
    best = np.full(t.shape[0], -np.inf, np.float32)
    for start in range(0, l.shape[0], 65536):  # bounded memory for large dictionaries
        best = np.maximum(best, (t @ l[start:start + 65536].T).max(axis=1))
    return float(best.mean())

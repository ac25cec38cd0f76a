"""Matryoshka BatchTopK SAE (Bussmann et al. 2025).

BatchTopK's selection (saejax.models.batchtopk) over all n latents; nested prefixes
of the dictionary m_1 < ... < m_p = n (by global latent index, across shards) each
reconstruct the input from their own latents, x_hat_i = z[:, :m_i] @ W_dec[:m_i] + b_pre.
Loss: the mean over prefixes of nmse(x, x_hat_i) (the mean, as dictionary_learning's
uniform group weights, keeps the scale of one nmse, so learning rate and AuxK's
coefficient carry over from BatchTopK) + auxk_coef * AuxK on the full reconstruction.
Inference as BatchTopK: a JumpReLU with the estimated threshold.
"""

from __future__ import annotations

from saejax.models.base import require
from saejax.models.batchtopk import BatchTopK, batchtopk_defaults, check_batchtopk


def parse_prefixes(text: str, n: int) -> tuple[int, ...]:
    """Prefix sizes from "a,b,...,n"; empty: n/64, n/16, n/4, n (those >= 1, distinct)."""
    if not text.strip():
        return tuple(sorted({max(1, n // 4**i) for i in range(4)}))
    return tuple(int(part) for part in text.split(","))


class Matryoshka(BatchTopK):
    name = "matryoshka"
    sparsity_key = "k"
    has_k = True

    @classmethod
    def defaults(cls):
        g = batchtopk_defaults()
        g.prefixes = ""  # comma-separated nested dictionary sizes ending at sae.n; empty: n/64,n/16,n/4,n
        return g

    @classmethod
    def check(cls, options, config):
        prefix = f"sae.{cls.name}"
        check_batchtopk(options, config, prefix)
        n = config.sae.n
        try:
            sizes = parse_prefixes(options.prefixes, n)
        except ValueError:
            sizes = None
        require(sizes is not None, f"{prefix}.prefixes={options.prefixes!r} must be comma-separated integers")
        require(all(m >= 1 for m in sizes), f"{prefix}.prefixes={options.prefixes!r} must be positive")
        require(all(a < b for a, b in zip(sizes, sizes[1:])),
                f"{prefix}.prefixes={options.prefixes!r} must be strictly increasing")
        require(sizes[-1] == n, f"Matryoshka prefixes that do not end at n: {prefix}.prefixes="
                f"{options.prefixes!r} must end at sae.n={n}")

    def __init__(self, config):
        super().__init__(config)
        self.prefixes = parse_prefixes(self.options.prefixes, self.n)

    def groups(self):
        return tuple(zip((0,) + self.prefixes[:-1], self.prefixes))

    def prefix_weights(self):
        return tuple(1.0 / len(self.prefixes) for _ in self.prefixes)

    def prefix_metrics(self, prefix_nmse):
        return {f"nmse_prefix_{m}": e for m, e in zip(self.prefixes, prefix_nmse, strict=True)}

    def describe(self):
        return f"{super().describe()} prefixes {','.join(map(str, self.prefixes))}"

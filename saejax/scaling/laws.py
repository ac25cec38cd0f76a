"""The scaling laws: their formulas, parameter names and log-space models.

Each law is fitted in log space (residual = log L_pred - log L_obs), because
losses span decades across a sweep and their noise is multiplicative (a seed
changes nmse by a few per cent, not by a fixed amount). Internally the inputs
are centred in log space (x / x_ref with x_ref their geometric mean): the
intercept and exponent of a·n^b are then nearly uncorrelated, which makes the
optimiser converge in a few iterations instead of crawling along a ridge.
Reported parameters are always in the original units of the formulas.

Besides the model and its Jacobian, a law knows what data it needs: how many
points and distinct inputs (`requirement`), so a fit refuses an
underdetermined problem and the bootstrap skips degenerate resamples.
"""

from __future__ import annotations

import numpy as np

# Exponents beyond this are not a scaling law but a runaway optimiser; bounding
# them keeps bootstrap refits of near-degenerate resamples from overflowing.
MAX_EXPONENT = 10.0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


class PowerLaw:
    """L(x) = a·x^b + c with a > 0 and c >= 0: a power law plus an irreducible floor.

    Internal parameters theta = (log a', b, c) for L = a'·(x/x_ref)^b + c, so
    a > 0 by construction and c >= 0 by a bound.
    """

    param_names = ("a", "b", "c")

    def __init__(self, variable: str):
        self.variable = variable
        self.name = f"L({variable})"
        self.formula = f"L({variable}) = a·{variable}^b + c"
        self.inputs = (variable,)

    def bounds(self, log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array([-np.inf, -MAX_EXPONENT, 0.0]), np.array([np.inf, MAX_EXPONENT, np.inf])

    def predict(self, params: dict[str, float], x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        return params["a"] * x ** params["b"] + params["c"]

    def requirement(self, X: np.ndarray) -> str | None:
        """Why these inputs cannot determine the law, or None if they can."""
        points, distinct = len(X), len(np.unique(X[:, 0]))
        needed = len(self.param_names)
        if points >= needed + 1 and distinct >= needed:
            return None
        return (f"{_count(points, 'point')} with {_count(distinct, f'distinct {self.variable} value')}; need at "
                f"least {needed + 1} points with at least {needed} distinct {self.variable} values")

    def centre(self, X: np.ndarray) -> np.ndarray:
        return np.array([np.mean(np.log(X[:, 0]))])

    def features(self, X: np.ndarray, centre: np.ndarray) -> np.ndarray:
        return np.log(X[:, :1]) - centre

    def log_model(self, theta: np.ndarray, F: np.ndarray) -> np.ndarray:
        u = F[:, 0]
        return np.logaddexp(theta[0] + theta[1] * u, np.log(theta[2]) if theta[2] > 0 else -np.inf)

    def jacobian(self, theta: np.ndarray, F: np.ndarray) -> np.ndarray:
        u = F[:, 0]
        power = np.exp(np.minimum(theta[0] + theta[1] * u, 700.0))
        total = power + theta[2]
        share = power / total
        return np.column_stack([share, share * u, 1.0 / total])

    def starts(self, F: np.ndarray, log_y: np.ndarray) -> list[np.ndarray]:
        """Floors below the smallest loss, then a line through log(L - c) against log x."""
        y = np.exp(log_y)
        u = F[:, 0]
        starts = []
        for fraction in (0.9, 0.5, 0.0, 0.99):
            c = fraction * y.min()
            slope, intercept = np.polyfit(u, np.log(y - c), 1)
            starts.append(np.array([intercept, np.clip(slope, -MAX_EXPONENT + 1e-3, MAX_EXPONENT - 1e-3), c]))
        return starts

    def to_params(self, theta: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """(log a', b, c) at x_ref -> (a, b, c); works on one theta or a stack of rows."""
        theta = np.atleast_2d(theta)
        log_a = theta[:, 0] - theta[:, 1] * centre[0]
        return np.column_stack([np.exp(log_a), theta[:, 1], theta[:, 2]])


class JointLaw:
    """Gao et al. (2024): L(n,k) = exp(α + β_k·log k + β_n·log n + γ·log k·log n) + exp(ζ + η·log k).

    The first term is the part of the loss more latents remove; the second an
    irreducible floor that depends only on k. Internally log k and log n are
    centred; the map back to the reported parameters is linear.
    """

    param_names = ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta")
    name = "L(n,k)"
    formula = "L(n,k) = exp(alpha + beta_k·log k + beta_n·log n + gamma·log k·log n) + exp(zeta + eta·log k)"
    inputs = ("n", "k")
    # Enough distinct values of each input to separate the k-only floor from the
    # n-dependent term and to see their curvature.
    min_distinct = 3

    # A floor below this fraction of the smallest loss is indistinguishable from
    # none; bounding it there stops refits of resamples that cannot see a floor
    # from running exp(zeta) off towards zero for hundreds of iterations.
    min_floor_fraction = 1e-4

    def bounds(self, log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e = MAX_EXPONENT
        lower = np.array([-np.inf, -e, -e, -e, np.min(log_y) + np.log(self.min_floor_fraction), -e])
        upper = np.array([np.inf, e, e, e, np.inf, e])
        return lower, upper

    def predict(self, params: dict[str, float], n, k) -> np.ndarray:
        log_n, log_k = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(k, dtype=float))
        p = params
        return (np.exp(p["alpha"] + p["beta_k"] * log_k + p["beta_n"] * log_n + p["gamma"] * log_k * log_n)
                + np.exp(p["zeta"] + p["eta"] * log_k))

    def requirement(self, X: np.ndarray) -> str | None:
        points = len(X)
        pairs = len({(a, b) for a, b in X.tolist()})
        distinct_n, distinct_k = len(np.unique(X[:, 0])), len(np.unique(X[:, 1]))
        needed = len(self.param_names)
        if (points >= needed + 1 and pairs >= needed
                and distinct_n >= self.min_distinct and distinct_k >= self.min_distinct):
            return None
        return (f"{_count(points, 'point')} at {_count(pairs, 'distinct (n, k) pair')}, {distinct_n} distinct n "
                f"and {distinct_k} distinct k values; need at least {needed + 1} points at {needed} distinct "
                f"(n, k) pairs, with at least {self.min_distinct} distinct n and {self.min_distinct} distinct k values")

    def centre(self, X: np.ndarray) -> np.ndarray:
        """(mean log k, mean log n)."""
        return np.array([np.mean(np.log(X[:, 1])), np.mean(np.log(X[:, 0]))])

    def features(self, X: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Columns u = log k - mean, v = log n - mean."""
        return np.column_stack([np.log(X[:, 1]) - centre[0], np.log(X[:, 0]) - centre[1]])

    def _terms(self, theta: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, v = F[:, 0], F[:, 1]
        return theta[0] + theta[1] * u + theta[2] * v + theta[3] * u * v, theta[4] + theta[5] * u

    def log_model(self, theta: np.ndarray, F: np.ndarray) -> np.ndarray:
        return np.logaddexp(*self._terms(theta, F))

    def jacobian(self, theta: np.ndarray, F: np.ndarray) -> np.ndarray:
        u, v = F[:, 0], F[:, 1]
        first, floor = self._terms(theta, F)
        w = 0.5 * (1.0 + np.tanh(0.5 * (first - floor)))  # share of the first term, a stable sigmoid
        return np.column_stack([w, w * u, w * v, w * u * v, 1.0 - w, (1.0 - w) * u])

    def starts(self, F: np.ndarray, log_y: np.ndarray) -> list[np.ndarray]:
        """A flat floor at a fraction of the smallest loss; the rest by linear least squares."""
        y = np.exp(log_y)
        u, v = F[:, 0], F[:, 1]
        design = np.column_stack([np.ones_like(u), u, v, u * v])
        starts = []
        for fraction in (0.5, 0.8, 0.2):
            floor = fraction * y.min()
            coef, *_ = np.linalg.lstsq(design, np.log(y - floor), rcond=None)
            starts.append(np.concatenate([coef, [np.log(floor), 0.0]]))
        return starts

    def to_params(self, theta: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Undo the centring (u = log k - mk, v = log n - mn); one theta or a stack of rows."""
        theta = np.atleast_2d(theta)
        mk, mn = centre
        a, bk, bn, g, z, e = theta.T
        return np.column_stack([
            a - bk * mk - bn * mn + g * mk * mn,
            bk - g * mn,
            bn - g * mk,
            g,
            z - e * mk,
            e,
        ])


LAWS = {law.name: law for law in (PowerLaw("n"), PowerLaw("k"), JointLaw())}


def get_law(name: str):
    """The law called `name`: "L(n)", "L(k)" or "L(n,k)"."""
    try:
        return LAWS[name]
    except KeyError:
        raise KeyError(f"unknown law {name!r}; known: {', '.join(LAWS)}") from None

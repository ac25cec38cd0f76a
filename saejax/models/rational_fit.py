"""Minimax fit of a pole-free rational function to a gate on [-1, 1] (numpy/scipy, no JAX).

r(u) = P(u) / Q(u),  P(u) = sum_{i=0..p} a_i u^i,  Q(u) = 1 + |B(u)|,  B(u) = sum_{j=1..q} b_j u^j
(the "safe Pade" denominator of Molina et al.'s PAUs, used by Yin & Yu's RSAE): Q >= 1, so r has no
pole anywhere, whatever b is.

The fit, on a dense grid (4001 points on [-1, 1] by default):
1. Least-squares start: the linearised problem min sum_i (P(u_i) - f_i (1 + B(u_i)))^2, one lstsq.
2. Minimax by differential correction (Cheney & Loeb), a linear programme per iteration
   (scipy.optimize.linprog, HiGHS): with h the current max error and D_k = 1 + B_k,
       min delta  s.t.  |f_i D(u_i) - P(u_i)| - h D(u_i) <= delta D_k(u_i),  B(u_i) >= 0,  |b_j| <= M.
   B >= 0 on the grid makes 1 + B = 1 + |B|, so the programme sees the safe rational exactly.
   The current iterate is feasible (delta <= 0), so the max error never rises; it stops when an
   iteration gains less than `tol` relative. This is a "relaxed" Remez: the exchange of reference
   points is done by the LP over the whole grid rather than by alternation on q+p+2 points. We use
   it because it needs no alternation set (a gate with a jump has none of the textbook kind) and
   it cannot cycle.
The result is the best of the LS start and the minimax iterates by true max error (so the minimax
error is never worse than the start), with the error reported on the grid.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np
from scipy.optimize import linprog

GRID_POINTS = 4001
COEF_BOUND = 1e3  # |b_j| <= M keeps each LP bounded (differential correction's normalisation)


def evaluate(a: np.ndarray, b: np.ndarray, u: np.ndarray) -> np.ndarray:
    """P(u) / (1 + |B(u)|) for coefficients a (p+1, constant first) and b (q, u^1 first)."""
    u = np.asarray(u, np.float64)
    return np.polynomial.polynomial.polyval(u, a) / denominator(b, u)


def denominator(b: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Q(u) = 1 + |sum_j b_j u^j|."""
    return 1.0 + np.abs(np.polynomial.polynomial.polyval(np.asarray(u, np.float64), np.r_[0.0, b]))


@dataclasses.dataclass(frozen=True)
class RationalFit:
    a: np.ndarray  # (p+1,) numerator coefficients, u^0 first
    b: np.ndarray  # (q,) denominator coefficients of u^1..u^q
    max_error: float  # max |f - r| on the grid
    ls_error: float  # max |f - r| of the least-squares start
    iterations: int  # minimax iterations run
    errors: tuple[float, ...]  # max error after the start and after each iteration


def gate(threshold: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """u * 1[u >= threshold]: ReLU at 0, a TopK/JumpReLU-style jump gate above 0."""
    return lambda u: np.where(u >= threshold, u, 0.0)


def _bases(u: np.ndarray, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    return np.vander(u, p + 1, increasing=True), np.vander(u, q + 1, increasing=True)[:, 1:]


def least_squares_start(f: np.ndarray, u: np.ndarray, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients minimising sum (P - f (1 + B))^2 (linear in a, b)."""
    vp, vq = _bases(u, p, q)
    design = np.concatenate([vp, -f[:, None] * vq], axis=1)
    coef, *_ = np.linalg.lstsq(design, f, rcond=None)
    return coef[: p + 1], coef[p + 1:]


def _correction(f, u, vp, vq, h, d_k, p, q):
    """One differential-correction LP; None if HiGHS fails."""
    n_a, n_b = p + 1, q
    # Variables: a (n_a), b (n_b), delta. D = 1 + vq @ b.
    #  f D - P - h D <= delta d_k  ->  -vp a + (f - h) vq b - d_k delta <= h - f
    # -f D + P - h D <= delta d_k  ->   vp a - (f + h) vq b - d_k delta <= h + f
    #                      B >= 0  ->  -vq b <= 0
    zeros_a = np.zeros((len(u), n_a))
    rows = [
        np.concatenate([-vp, (f - h)[:, None] * vq, -d_k[:, None]], axis=1),
        np.concatenate([vp, -(f + h)[:, None] * vq, -d_k[:, None]], axis=1),
    ]
    rhs = [h - f, h + f]
    if n_b:
        rows.append(np.concatenate([zeros_a, -vq, np.zeros((len(u), 1))], axis=1))
        rhs.append(np.zeros(len(u)))
    cost = np.zeros(n_a + n_b + 1)
    cost[-1] = 1.0
    bounds = [(None, None)] * n_a + [(-COEF_BOUND, COEF_BOUND)] * n_b + [(None, None)]
    result = linprog(cost, A_ub=np.concatenate(rows), b_ub=np.concatenate(rhs), bounds=bounds, method="highs")
    if result.status != 0:
        return None
    return result.x[:n_a], result.x[n_a:n_a + n_b]


def fit(f: Callable[[np.ndarray], np.ndarray], p: int, q: int, points: int = GRID_POINTS,
        max_iterations: int = 20, tol: float = 1e-3) -> RationalFit:
    """Best safe-Pade rational of type (p, q) to f on `points` equispaced points of [-1, 1]."""
    u = np.linspace(-1.0, 1.0, points)
    target = np.asarray(f(u), np.float64)
    vp, vq = _bases(u, p, q)

    def error(a, b):
        return float(np.max(np.abs(target - evaluate(a, b, u))))

    a, b = least_squares_start(target, u, p, q)
    ls_error = error(a, b)
    best = (ls_error, a, b)
    errors = [ls_error]
    if not np.all(np.polynomial.polynomial.polyval(u, np.r_[0.0, b]) >= 0):
        # The correction needs a feasible iterate (B >= 0): start it from the polynomial (b = 0).
        a, *_ = np.linalg.lstsq(vp, target, rcond=None)
        b = np.zeros(q)
    h, iterations = error(a, b), 0
    for iterations in range(1, max_iterations + 1):
        d_k = 1.0 + vq @ b
        step = _correction(target, u, vp, vq, h, d_k, p, q)
        if step is None:
            break
        a_new, b_new = step
        h_new = error(a_new, b_new)
        errors.append(h_new)
        if h_new < best[0]:
            best = (h_new, a_new, b_new)
        if h_new >= h * (1 - tol):
            break
        a, b, h = a_new, b_new, h_new
    max_error, a, b = best
    return RationalFit(a=np.asarray(a), b=np.asarray(b), max_error=max_error, ls_error=ls_error,
                       iterations=iterations, errors=tuple(errors))


@functools.lru_cache(maxsize=64)
def fit_gate(p: int, q: int, threshold: float = 0.0) -> RationalFit:
    """The (cached) fit of u * 1[u >= threshold] on [-1, 1]."""
    return fit(gate(threshold), p, q)

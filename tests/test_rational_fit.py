"""The safe-Pade minimax fit (saejax.models.rational_fit) against known answers on [-1, 1]."""

import numpy as np
import pytest

from saejax.models import rational_fit as rf

GRID = np.linspace(-1.0, 1.0, rf.GRID_POINTS)


@pytest.fixture(scope="module")
def relu_fits():
    return {degrees: rf.fit_gate(*degrees) for degrees in [(3, 2), (5, 4), (9, 8)]}


def test_relu_is_reproduced_within_the_stated_error(relu_fits):
    fit = relu_fits[(3, 2)]
    error = np.max(np.abs(np.maximum(GRID, 0.0) - rf.evaluate(fit.a, fit.b, GRID)))
    assert error == pytest.approx(fit.max_error, rel=1e-12)  # the reported error is the grid's
    assert error < 0.025  # measured 0.0218 for type (3, 2), the paper's ReLU degrees
    assert relu_fits[(9, 8)].max_error < 0.003  # measured 0.0022
    # Between grid points too (a pole-free rational cannot hide a spike there).
    fine = np.linspace(-1.0, 1.0, 40001)
    assert np.max(np.abs(np.maximum(fine, 0) - rf.evaluate(fit.a, fit.b, fine))) < 0.025


def test_error_falls_with_degree(relu_fits):
    errors = [relu_fits[d].max_error for d in [(3, 2), (5, 4), (9, 8)]]
    assert errors[0] > errors[1] > errors[2]


def test_minimax_is_no_worse_than_the_least_squares_start(relu_fits):
    for degrees, fit in relu_fits.items():
        assert fit.max_error <= fit.ls_error, degrees
        assert fit.errors[0] == fit.ls_error and fit.max_error == min(fit.errors)
    # The start really is the plain linearised least squares, and minimax improves on it here.
    a, b = rf.least_squares_start(np.maximum(GRID, 0.0), GRID, 3, 2)
    assert np.max(np.abs(np.maximum(GRID, 0) - rf.evaluate(a, b, GRID))) == pytest.approx(relu_fits[(3, 2)].ls_error)
    assert relu_fits[(3, 2)].max_error < 0.5 * relu_fits[(3, 2)].ls_error


def test_the_denominator_has_no_zero_on_the_range(relu_fits):
    for degrees, fit in relu_fits.items():
        q = rf.denominator(fit.b, GRID)
        assert np.min(q) >= 1.0, degrees
        # The plain denominator 1 + B (what the safe one equals where B >= 0) has no real root in
        # [-1, 1] either: Q is smooth there, not only non-zero.
        roots = np.polynomial.polynomial.polyroots(np.r_[1.0, fit.b])
        real = roots[np.abs(roots.imag) < 1e-9].real
        assert not np.any(np.abs(real) <= 1.0), (degrees, real)


def test_a_jump_gate_fits_to_half_its_jump():
    # u * 1[u >= 0.1] jumps by 0.1: no continuous function gets closer than 0.05 in max error.
    fit = rf.fit_gate(5, 4, 0.1)
    assert fit.max_error <= fit.ls_error
    assert 0.045 < fit.max_error < 0.12  # measured 0.106 for type (5, 4)
    assert np.min(rf.denominator(fit.b, GRID)) >= 1.0

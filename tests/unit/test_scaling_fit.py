"""Scaling-law fits recover known laws from noisy synthetic data, and refuse data that cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from mixmae_scale.scaling.fit import (
    FitError,
    compute_law,
    compute_optimal,
    extrapolation_error,
    fit_compute,
    fit_nd,
    nd_law,
)


def test_compute_law_exponent_is_recovered_within_5_percent():
    rng = np.random.default_rng(0)
    c = np.logspace(15, 19, 12)
    loss = compute_law(c, 0.8, 3.0e4, 0.3) * np.exp(rng.normal(0, 0.005, c.size))
    fit = fit_compute(c, loss, bootstrap=50)
    assert fit["alpha"] == pytest.approx(0.3, rel=0.05)
    assert fit["E"] == pytest.approx(0.8, rel=0.05)
    low, high = fit.intervals["alpha"]
    assert low <= fit["alpha"] <= high and high - low < 0.2
    # An outlier run does not drag the robust fit.
    loss[3] *= 1.5
    assert fit_compute(c, loss)["alpha"] == pytest.approx(0.3, rel=0.05)


def test_nd_law_exponents_are_recovered_within_5_percent():
    rng = np.random.default_rng(1)
    n, d = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 5), np.logspace(7, 10, 5)))
    loss = nd_law(n, d, 0.5, 40.0, 0.34, 400.0, 0.28) * np.exp(rng.normal(0, 0.003, n.size))
    fit = fit_nd(n, d, loss)
    assert fit["alpha"] == pytest.approx(0.34, rel=0.05) and fit["beta"] == pytest.approx(0.28, rel=0.05)
    n_opt, d_opt = compute_optimal(fit, np.array([1e20, 1e22]), flops_per_param_image=6.0)
    assert np.allclose(n_opt * d_opt * 6.0, [1e20, 1e22])
    # Larger budgets put more into both, with exponents beta/(alpha+beta) and alpha/(alpha+beta).
    growth = np.log(n_opt[1] / n_opt[0]) / np.log(100)
    assert growth == pytest.approx(0.28 / (0.34 + 0.28), rel=0.1)


def test_extrapolation_check_predicts_held_out_largest_runs():
    c = np.logspace(15, 19, 10)
    loss = compute_law(c, 0.8, 3.0e4, 0.3)
    assert extrapolation_error(c, loss)["max_relative_error"] < 0.01


def test_data_that_cannot_fit_is_refused():
    with pytest.raises(FitError, match="at least 4 runs"):
        fit_compute(np.array([1.0, 2.0]), np.array([1.0, 0.9]))
    with pytest.raises(FitError, match="finite and positive"):
        fit_compute(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, np.nan, 0.8, 0.7]))
    with pytest.raises(FitError, match="different lengths"):
        fit_nd(np.ones(6), np.ones(5), np.ones(6))

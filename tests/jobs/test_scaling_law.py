"""The scaling-law fit recovers known parameters from points generated with them."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.scaling_law import PARAMS, compute_flops, fit_scaling_law

TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}


def _points(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e4, 1e7, 5), np.geomspace(1e3, 1e6, 5))
    n, d = n.ravel(), d.ravel()
    clean = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
    return n, d, clean * np.exp(rng.normal(0.0, noise, n.shape))


def test_exact_points_recover_the_parameters():
    n, d, loss = _points(noise=0.0)
    fit = fit_scaling_law(n, d, loss, n_bootstrap=0)
    for k in PARAMS:
        assert fit.params[k] == pytest.approx(TRUE[k], rel=1e-3), k
    assert fit.rmse_log < 1e-6
    assert np.allclose(fit.predict(n, d), loss, rtol=1e-5)


def test_noisy_points_recover_the_parameters_within_the_bootstrap_ci():
    n, d, loss = _points(noise=0.01, seed=3)
    fit = fit_scaling_law(n, d, loss, n_bootstrap=60, seed=0)
    assert fit.n_bootstrap >= 50
    for k in PARAMS:
        lo, hi = fit.ci[k]
        assert lo <= fit.params[k] <= hi, k
        assert lo <= TRUE[k] <= hi, f"{k}: true {TRUE[k]} outside CI ({lo:.4g}, {hi:.4g})"
    # The exponents are well determined by a 5 x 5 grid over three decades.
    assert abs(fit.params["alpha"] - TRUE["alpha"]) < 0.05
    assert abs(fit.params["beta"] - TRUE["beta"]) < 0.05
    # More noise, wider intervals.
    wide = fit_scaling_law(n, d, _points(noise=0.05, seed=3)[2], n_bootstrap=60, seed=0)
    assert (wide.ci["alpha"][1] - wide.ci["alpha"][0]) > (fit.ci["alpha"][1] - fit.ci["alpha"][0])


def test_bad_inputs_say_what_to_fix():
    with pytest.raises(ValueError, match="distinct model sizes"):
        fit_scaling_law([1e4] * 6, np.geomspace(1e3, 1e5, 6), np.linspace(2, 1, 6))
    with pytest.raises(ValueError, match="failed run"):
        fit_scaling_law([1e4, 1e5, 1e4, 1e5, 1e6], [1e3, 1e3, 1e4, 1e4, 1e5], [2, 1, np.nan, 1, 1])


def test_compute_is_six_n_d():
    assert compute_flops([10, 20], [3, 4]).tolist() == [180.0, 480.0]

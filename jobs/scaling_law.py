"""Scaling-law fit: L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap confidence intervals.

N is the model size (non-embedding parameters), D the data size (pretraining cells), L a loss. The fit follows
Hoffmann et al. (2022, "Chinchilla", approach 3): parameters a = log A, b = log B, e = log E keep A, B, E
positive, and the residual is taken in log space,

    r_i = LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i,

minimised with `scipy.optimize.least_squares` (squared loss, or Chinchilla's Huber loss on request; alpha and
beta bounded to [0, max_exponent]) from a grid of starting points; the best of them wins. Confidence intervals come from a nonparametric bootstrap over
grid points (resample the (N, D, L) triples with replacement, refit, take percentiles).

    fit = fit_scaling_law(N, D, L, n_bootstrap=200)
    fit.params["alpha"], fit.ci["alpha"]            # point estimate, (low, high)
    fit.predict(N, D)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

PARAMS = ("E", "A", "alpha", "B", "beta")


@dataclass
class ScalingFit:
    """A fitted L(N, D) with bootstrap percentile intervals."""

    params: dict[str, float]
    """E, A, alpha, B, beta (point estimate on all points)."""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(low, high) percentile interval of each parameter over the bootstrap refits."""
    level: float = 0.95
    """Coverage of `ci`."""
    n_points: int = 0
    n_bootstrap: int = 0
    """Bootstrap refits that succeeded (resamples with fewer distinct N or D values than needed are skipped)."""
    rmse_log: float = float("nan")
    """Root-mean-square residual in log L of the point estimate."""

    def predict(self, n, d) -> np.ndarray:
        p = self.params
        n = np.asarray(n, dtype=np.float64)
        d = np.asarray(d, dtype=np.float64)
        return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]

    def to_dict(self) -> dict:
        return {
            "params": dict(self.params),
            "ci": {k: list(v) for k, v in self.ci.items()},
            "level": self.level,
            "n_points": self.n_points,
            "n_bootstrap": self.n_bootstrap,
            "rmse_log": self.rmse_log,
        }

    def rows(self) -> list[dict]:
        """One table row per parameter: estimate and interval."""
        pct = f"{self.level:.0%}"
        return [
            {
                "parameter": k,
                "estimate": self.params[k],
                f"{pct} CI low": self.ci.get(k, (np.nan, np.nan))[0],
                f"{pct} CI high": self.ci.get(k, (np.nan, np.nan))[1],
            }
            for k in PARAMS
        ]


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    a, alpha, b, beta, e = theta
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, P)


def _residuals(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    terms = _terms(theta, log_n, log_d)
    top = terms.max(0)
    return top + np.log(np.exp(terms - top).sum(0)) - log_l


def _jacobian(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    """d r / d (a, alpha, b, beta, e): the softmax weights of the three terms (analytic, so a fit is
    milliseconds instead of finite differences)."""
    terms = _terms(theta, log_n, log_d)
    w = np.exp(terms - terms.max(0))
    w /= w.sum(0)  # (3, P)
    return np.stack([w[0], -w[0] * log_n, w[1], -w[1] * log_d, w[2]], axis=1)  # (P, 5)


def _fit_once(
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    starts: list[np.ndarray],
    max_exponent: float,
    huber_delta: float | None,
) -> np.ndarray:
    from scipy.optimize import least_squares

    lower = np.array([-np.inf, 0.0, -np.inf, 0.0, -np.inf])
    upper = np.array([np.inf, max_exponent, np.inf, max_exponent, np.inf])
    best, best_cost = None, np.inf
    for x0 in starts:
        res = least_squares(
            _residuals,
            np.clip(x0, lower + 1e-9, upper - 1e-9),
            jac=_jacobian,
            bounds=(lower, upper),
            loss="linear" if huber_delta is None else "huber",
            f_scale=huber_delta or 1.0,
            args=(log_n, log_d, log_l),
            max_nfev=2000,
        )
        if res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return best


def _starts(log_l: np.ndarray, max_exponent: float) -> list[np.ndarray]:
    """A small grid of starting points (Chinchilla fits from a grid too: the loss surface has local minima)."""
    e0 = float(log_l.min()) - 0.5
    grid = itertools.product(
        (0.0, 6.0),  # a = log A
        (0.2, min(0.8, max_exponent)),  # alpha
        (0.0, 6.0),  # b = log B
        (0.2, min(0.8, max_exponent)),  # beta
        (e0, e0 - 2.0),  # e = log E
    )
    return [np.array(g, dtype=np.float64) for g in grid]


def _to_params(theta: np.ndarray) -> dict[str, float]:
    a, alpha, b, beta, e = theta
    return {
        "E": float(np.exp(e)),
        "A": float(np.exp(a)),
        "alpha": float(alpha),
        "B": float(np.exp(b)),
        "beta": float(beta),
    }


def fit_scaling_law(
    n,
    d,
    loss,
    n_bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
    max_exponent: float = 3.0,
    huber_delta: float | None = None,
) -> ScalingFit:
    """Fit L = E + A/N^alpha + B/D^beta to points (n, d, loss); bootstrap CIs over the points.

    `huber_delta` switches the squared loss to Chinchilla's Huber loss with that delta (robust to outlier
    runs; converges ~10x slower). Needs at least two distinct N and two distinct D values and 5 points (one per parameter)."""
    n = np.asarray(n, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if not (n.shape == d.shape == loss.shape) or n.ndim != 1:
        raise ValueError(
            f"n, d and loss must be 1-d arrays of one length, got {n.shape}, {d.shape}, {loss.shape}"
        )
    ok = np.isfinite(loss) & (loss > 0) & (n > 0) & (d > 0)
    if not ok.all():
        raise ValueError(
            f"{int((~ok).sum())} point(s) have a non-positive or non-finite N, D or loss; drop them "
            "before fitting (a failed run has no loss)"
        )
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(n) < len(PARAMS):
        raise ValueError(
            f"a scaling-law fit needs >= 2 distinct model sizes, >= 2 distinct data sizes and >= "
            f"{len(PARAMS)} points; got {len(np.unique(n))} sizes, {len(np.unique(d))} data sizes, "
            f"{len(n)} points: widen the grid"
        )
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    starts = _starts(log_l, max_exponent)
    theta = _fit_once(log_n, log_d, log_l, starts, max_exponent, huber_delta)
    resid = _residuals(theta, log_n, log_d, log_l)
    fit = ScalingFit(
        params=_to_params(theta),
        level=level,
        n_points=len(n),
        rmse_log=float(np.sqrt(np.mean(resid**2))),
    )
    if n_bootstrap <= 0:
        return fit

    rng = np.random.default_rng(seed)
    # Bootstrap refits start from the full-data optimum plus a few grid points: cheaper than the full grid
    # and still robust to the occasional resample that moves the optimum far away.
    boot_starts = [theta] + starts[:: max(1, len(starts) // 3)]
    samples = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
            continue  # the exponent of a single size is not identified
        samples.append(
            _fit_once(log_n[idx], log_d[idx], log_l[idx], boot_starts, max_exponent, huber_delta)
        )
    if samples:
        boot = np.array([[p[k] for k in PARAMS] for p in map(_to_params, samples)])
        lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
        fit.ci = {
            k: (float(np.percentile(boot[:, i], lo)), float(np.percentile(boot[:, i], hi)))
            for i, k in enumerate(PARAMS)
        }
    fit.n_bootstrap = len(samples)
    return fit


def compute_flops(n_params, tokens) -> np.ndarray:
    """Training compute C = 6 N D (forward + backward FLOPs per parameter per token, Kaplan et al. 2020)."""
    return 6.0 * np.asarray(n_params, dtype=np.float64) * np.asarray(tokens, dtype=np.float64)

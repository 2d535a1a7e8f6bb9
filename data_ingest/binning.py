"""Per-cell value binning, exactly as the scGPT reference (`scgpt.preprocess`).

For one cell, the non-zero values are cut at `n_bins - 1` of their own quantiles (`linspace(0, 1, n_bins - 1)`)
into bins `1 .. n_bins - 1`; zeros stay 0. A value equal to one or more bin edges is placed uniformly at random
between its left and right bin (the reference's `_digitize(side="both")`). The reference draws the uniforms
from `np.random`; here the caller passes them (the tokenizer hashes `(seed, cell_id, gene)`, see
`data_ingest.tokenize`) or a seeded generator, so the result is reproducible. Because only the order of a
cell's own values matters, binning is unchanged by any per-cell monotone transform (library-size
normalization, log1p).
"""

from __future__ import annotations

import numpy as np

Draws = np.random.Generator | np.ndarray
"""Tie-break uniforms in [0, 1): one per value, or a generator to draw them from."""


def _uniforms(draws: Draws, n: int) -> np.ndarray:
    if isinstance(draws, np.random.Generator):
        return draws.random(n)
    u = np.asarray(draws, dtype=np.float64)
    if u.shape != (n,):
        raise ValueError(f"got {u.shape} tie-break draws for {n} values; pass one per value")
    return u


def digitize_both(x: np.ndarray, edges: np.ndarray, draws: Draws) -> np.ndarray:
    """Bin index of each value; values on an edge go uniformly between their left and right bins."""
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    u = _uniforms(draws, len(x))
    return np.ceil(u * (right - left) + left).astype(np.int64)


def bin_nonzero(values: np.ndarray, n_bins: int, draws: Draws) -> np.ndarray:
    """Bins `1 .. n_bins - 1` for the strictly positive `values` of one cell (all of them non-zero)."""
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.quantile(values, np.linspace(0.0, 1.0, n_bins - 1))
    digits = digitize_both(values, edges, draws)
    return np.clip(digits, 1, n_bins - 1)


def bin_cell(row: np.ndarray, n_bins: int, draws: Draws) -> np.ndarray:
    """Bin a dense expression row: zeros stay 0, non-zeros get bins `1 .. n_bins - 1`.

    `draws` is a generator, or one tie-break uniform per non-zero value of the row (in row order)."""
    row = np.asarray(row, dtype=np.float64)
    if np.any(row < 0):
        raise ValueError(
            "expression values must be non-negative; pass raw counts or log-normalized data"
        )
    out = np.zeros(row.shape, dtype=np.int64)
    nz = np.flatnonzero(row)
    out[nz] = bin_nonzero(row[nz], n_bins, draws)
    return out

"""Expression preprocessing shared by the evaluation modules and their baselines: library-size normalisation
+ log1p, telling counts from already-normalised values, and picking highly variable genes."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e4
"""Counts per cell after library-size normalisation (scanpy / Seurat convention)."""


def is_count_matrix(X) -> bool:
    """True when every stored value is a whole number (raw counts)."""
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    return bool(data.size) and bool(np.allclose(data, np.round(data)))


def log_normalize(X, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """log1p(counts / library size * target_sum) of a cells x genes matrix (N, G), sparse float64; empty
    cells stay zero. The project's one library-size normalisation: every task, baseline and evaluation
    calls it (`.toarray()` where a dense matrix is needed). Values that are not counts are taken as already
    log-normalised (e.g. pbmc68k_reduced's `.raw`) and returned unchanged."""
    X = sp.csr_matrix(X, dtype=np.float64)
    if not is_count_matrix(X):
        return X
    lib = np.asarray(X.sum(1)).ravel()  # (N,)
    X = sp.csr_matrix(sp.diags(target_sum / np.maximum(lib, 1e-12)) @ X)
    X.data = np.log1p(X.data)
    return X


def hvg_index(logX: np.ndarray, n_hvg: int) -> np.ndarray:
    """Indices of the `n_hvg` genes with the highest normalised dispersion (scanpy's `seurat` flavour)."""
    import anndata as ad
    import scanpy as sc  # heavy; only the tasks' baselines need it

    if n_hvg >= logX.shape[1]:
        return np.arange(logX.shape[1])
    tmp = ad.AnnData(X=logX)
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_hvg, flavor="seurat")
    return np.flatnonzero(tmp.var["highly_variable"].to_numpy())

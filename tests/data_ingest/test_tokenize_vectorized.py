"""The vectorized tokenizer equals the per-cell reference definition, record for record."""

import numpy as np
import pytest
import scipy.sparse as sp

from data_ingest.tokenize import TokenizerConfig, TokenizeStats, tokenize_csr
from data_ingest.tokenize_reference import tokenize_csr_reference


def _data(seed, n=60, g=300, kind="counts"):
    rng = np.random.default_rng(seed)
    dens = rng.uniform(0.0, 0.5, n)[:, None]  # very sparse to fairly dense cells
    mask = rng.random((n, g)) < dens
    if kind == "counts":
        vals = rng.poisson(rng.gamma(0.7, 3.0, (n, g))) + 0.0
    else:  # log-normalized float32: few ties
        vals = np.log1p(rng.gamma(1.0, 2.0, (n, g))).astype(np.float32)
    X = sp.csr_matrix(np.where(mask, vals, 0.0))
    X.data = X.data.astype(np.float32 if kind != "counts" else np.float64)
    X[3] = 0  # an empty cell
    X[5] = 0
    X[5, 7] = 4.0  # a one-gene cell
    X.eliminate_zeros()
    X.data[::17] = 0.0  # explicit zeros stay unexpressed
    tokens = np.arange(g) + 10
    tokens[rng.random(g) < 0.1] = -1  # genes unknown to the vocabulary
    return X, tokens


@pytest.mark.parametrize("kind", ["counts", "lognorm"])
@pytest.mark.parametrize(
    "cfg",
    [
        TokenizerConfig(n_bins=51, max_seq_len=512, seed=1),
        TokenizerConfig(n_bins=5, max_seq_len=20, seed=2),
        TokenizerConfig(n_bins=11, max_seq_len=64, include_zero_genes=True, seed=3),
        TokenizerConfig(n_bins=51, max_seq_len=32, min_genes=0, seed=4),
        TokenizerConfig(n_bins=51, max_seq_len=40, min_genes=25, seed=5),
        TokenizerConfig(n_bins=51, max_seq_len=40, seed=6, tie_break="mid"),
        TokenizerConfig(n_bins=11, max_seq_len=512, seed=7, tie_break="mid"),
        TokenizerConfig(n_bins=51, max_seq_len=24, seed=8, gene_selection="top"),
        TokenizerConfig(n_bins=51, max_seq_len=60, seed=9, gene_selection="top", tie_break="mid"),
    ],
)
def test_matches_reference(kind, cfg):
    X, tokens = _data(hash((kind, cfg.seed)) % 1000, kind=kind)
    # Scramble column order inside rows: output follows CSR order, whatever it is.
    rng = np.random.default_rng(0)
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        p = rng.permutation(hi - lo) + lo
        X.indices[lo:hi], X.data[lo:hi] = X.indices[p].copy(), X.data[p].copy()
    ids = np.arange(X.shape[0]) * 7 + 3
    batch = np.arange(X.shape[0]) % 3
    s1, s2 = TokenizeStats(), TokenizeStats()
    fast = tokenize_csr(X.indptr, X.indices, X.data, ids, tokens, cfg, 1, batch=batch, stats=s1)
    ref = tokenize_csr_reference(
        X.indptr, X.indices, X.data, ids, tokens, cfg, 1, batch=batch, stats=s2
    )
    assert fast.num_rows > 0
    assert fast.equals(ref)
    assert s1 == s2


def test_matches_reference_on_large_cells():
    # ~1500 genes per cell, 600 kept: many keys share a sub-sampling histogram bucket.
    X, tokens = _data(11, n=12, g=3000)
    cfg = TokenizerConfig(max_seq_len=600, seed=6)
    ids = np.arange(X.shape[0]) + 5
    fast = tokenize_csr(X.indptr, X.indices, X.data, ids, tokens, cfg, 1)
    ref = tokenize_csr_reference(X.indptr, X.indices, X.data, ids, tokens, cfg, 1)
    assert fast.equals(ref)
    assert max(len(g) for g in fast["genes"].to_pylist()) == 600


def test_non_float32_values_use_the_reference():
    X, tokens = _data(9, kind="counts")
    X.data = X.data + 1e-9  # not representable in float32
    cfg = TokenizerConfig(max_seq_len=32)
    ids = np.arange(X.shape[0])
    a = tokenize_csr(X.indptr, X.indices, X.data, ids, tokens, cfg, 1)
    b = tokenize_csr_reference(X.indptr, X.indices, X.data, ids, tokens, cfg, 1)
    assert a.equals(b)

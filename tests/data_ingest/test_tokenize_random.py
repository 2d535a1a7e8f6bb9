"""The tokenizer's random choices: counter-based (hashed per seed, cell and gene), uniform, independent of
which other cells are tokenized with a cell, and binning equal to the scGPT reference formula."""

import numpy as np
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.tokenize import TokenizerConfig, tie_uniforms, tokenize_csr

N_GENES = 40
REFERENCE = {"gene_selection": "random", "tie_break": "random"}
"""The scGPT reference's tokenizer choices (the defaults keep the top genes and give ties the middle bin)."""


def _tokenize(X, ids, cfg, tokens=None):
    tokens = np.arange(X.shape[1]) + 10 if tokens is None else tokens
    return tokenize_csr(X.indptr, X.indices, X.data, ids, tokens, cfg, 1)


def _by_cell(table):
    return {r[keys.CELL_ID]: (r[keys.GENES], r[keys.VALUES]) for r in table.to_pylist()}


def test_sub_sampling_is_uniform():
    # 4000 cells with the same 40 expressed genes keep 10 each: every gene, and every pair of genes,
    # must be kept as often as a uniform 10-of-40 sample keeps it.
    n, keep = 4000, 10
    X = sp.csr_matrix(np.tile(np.arange(1.0, N_GENES + 1), (n, 1)))
    tab = _tokenize(
        X,
        np.arange(n) * 3 + 11,
        TokenizerConfig(max_seq_len=keep + 1, seed=5, gene_selection="random"),
    )
    kept = np.zeros((n, N_GENES), bool)
    for i, genes in enumerate(tab[keys.GENES].to_pylist()):
        assert len(genes) == keep + 1 and genes == [1, *sorted(genes[1:])]  # column order
        kept[i, np.asarray(genes[1:]) - 10] = True
    p = keep / N_GENES
    per_gene = kept.sum(0)
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(per_gene - n * p) < 4.5 * sd), per_gene
    p2 = keep * (keep - 1) / (N_GENES * (N_GENES - 1))
    pairs = (kept[:, :, None] & kept[:, None, :]).sum(0)[np.triu_indices(N_GENES, 1)]
    sd2 = np.sqrt(n * p2 * (1 - p2))
    assert np.all(np.abs(pairs - n * p2) < 5 * sd2)
    # Chi-square of the gene frequencies against uniform stays in the bulk of chi2(39).
    chi2 = float((((per_gene - n * p) ** 2) / (n * p)).sum())
    assert 15 < chi2 < 75, chi2


def test_choices_depend_on_seed_and_cell_only():
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((30, 200)) < 0.4, rng.poisson(3.0, (30, 200)) + 1.0, 0.0)
    X = sp.csr_matrix(dense)
    ids = rng.choice(10**9, 30, replace=False)
    cfg = TokenizerConfig(max_seq_len=40, seed=2, **REFERENCE)
    together = _by_cell(_tokenize(X, ids, cfg))
    # Same records when each cell is tokenized alone, or with other cells in another order.
    for i in range(0, 30, 7):
        alone = _by_cell(_tokenize(X[i], ids[i : i + 1], cfg))
        assert alone[ids[i]] == together[ids[i]]
    perm = rng.permutation(30)
    assert _by_cell(_tokenize(X[perm], ids[perm], cfg)) == together
    # Another seed or another cell id changes the sample.
    other_seed = _by_cell(_tokenize(X, ids, TokenizerConfig(max_seq_len=40, seed=3, **REFERENCE)))
    assert all(other_seed[c][0] != together[c][0] for c in ids)
    moved = _by_cell(_tokenize(X, ids + 1, cfg))
    assert all(moved[c + 1][0] != together[c][0] for c in ids)


def test_bins_follow_the_scgpt_reference_formula():
    # The reference (scgpt.preprocess.binning): edges = np.quantile(nonzero, linspace(0, 1, n_bins - 1)),
    # digits = ceil(u * (right - left) + left) with left / right = np.digitize(x, edges[, right=True]);
    # u is the hashed uniform of (seed, cell, gene). Counts (many ties) and log-normalized values.
    rng = np.random.default_rng(1)
    for values in (rng.poisson(2.0, (25, 300)) + 1.0, np.log1p(rng.gamma(1.0, 3.0, (25, 300)))):
        dense = np.where(rng.random((25, 300)) < 0.5, values, 0.0).astype(np.float32)
        X = sp.csr_matrix(dense)
        ids = np.arange(25) + 1000
        tab = _tokenize(X, ids, TokenizerConfig(max_seq_len=301, n_bins=51, seed=9, **REFERENCE))
        for i, (genes, vals) in enumerate(
            zip(tab[keys.GENES].to_pylist(), tab[keys.VALUES].to_pylist(), strict=True)
        ):
            nz = np.flatnonzero(dense[i])
            x = dense[i, nz].astype(np.float64)
            edges = np.quantile(x, np.linspace(0, 1, 50))
            left, right = np.digitize(x, edges), np.digitize(x, edges, right=True)
            u = tie_uniforms(9, np.full(len(nz), ids[i]), nz + 10)
            expected = np.clip(np.ceil(u * (right - left) + left), 1, 50)
            assert genes[1:] == (nz + 10).tolist()
            assert vals[1:] == expected.astype(int).tolist()

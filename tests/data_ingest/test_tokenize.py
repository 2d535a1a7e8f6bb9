import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.binning import bin_nonzero
from data_ingest.tokenize import TokenizerConfig, TokenizeStats, tie_uniforms, tokenize_csr
from data_ingest.vocab import GeneVocab


def _cells(n=20, g=40, seed=0):
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n, g)) < 0.5, 0.0, rng.poisson(4.0, (n, g)) + 1.0)
    return sp.csr_matrix(dense), [f"G{i}" for i in range(g)]


def test_round_trip_genes_and_values():
    X, genes = _cells()
    vocab = GeneVocab.from_genes(genes)
    cfg = TokenizerConfig(n_bins=11, max_seq_len=100, seed=7, tie_break="random")
    tab = tokenize_csr(
        X.indptr,
        X.indices,
        X.data,
        np.arange(X.shape[0]) + 100,
        vocab.lookup(genes),
        cfg,
        vocab.cls_id,
    )
    assert tab.num_rows == X.shape[0]
    for i, rec in enumerate(tab.to_pylist()):
        assert rec[keys.GENES][0] == vocab.cls_id and rec[keys.VALUES][0] == keys.PAD_VALUE
        names = [vocab.token(t) for t in rec[keys.GENES][1:]]
        row = X[i].toarray().ravel()
        # Exactly the expressed genes, in column order, with the bins binning gives for this cell's seed.
        assert names == [genes[j] for j in np.flatnonzero(row)]
        tok = vocab.lookup([genes[j] for j in np.flatnonzero(row)])
        u = tie_uniforms(7, np.full(len(tok), 100 + i), tok)
        expected = bin_nonzero(row[row > 0], 11, u)
        assert rec[keys.VALUES][1:] == expected.tolist()
        assert rec[keys.CELL_ID] == 100 + i


def test_truncation_and_zero_fill_and_skips():
    X, genes = _cells(n=10, g=60)
    vocab = GeneVocab.from_genes(genes)
    tokens = vocab.lookup(genes)
    stats = TokenizeStats()
    short = tokenize_csr(
        X.indptr,
        X.indices,
        X.data,
        np.arange(10),
        tokens,
        TokenizerConfig(max_seq_len=8),
        vocab.cls_id,
        stats=stats,
    )
    assert all(len(g) == 8 for g in short[keys.GENES].to_pylist())
    assert stats.truncated == 10
    # Truncation is a seeded random subset: the same cell always keeps the same genes.
    again = tokenize_csr(
        X.indptr,
        X.indices,
        X.data,
        np.arange(10),
        tokens,
        TokenizerConfig(max_seq_len=8),
        vocab.cls_id,
    )
    assert short.equals(again)

    full = tokenize_csr(
        X.indptr,
        X.indices,
        X.data,
        np.arange(10),
        tokens,
        TokenizerConfig(max_seq_len=61, include_zero_genes=True),
        vocab.cls_id,
    )
    for rec in full.to_pylist():
        assert len(rec[keys.GENES]) == 61 and len(set(rec[keys.GENES])) == 61
        assert 0 in rec[keys.VALUES]

    empty = sp.csr_matrix((2, 60))
    stats = TokenizeStats()
    out = tokenize_csr(
        empty.indptr,
        empty.indices,
        empty.data,
        np.arange(2),
        tokens,
        TokenizerConfig(),
        vocab.cls_id,
        stats=stats,
    )
    assert out.num_rows == 0 and stats.skipped_few_genes == 2


def test_unknown_genes_are_dropped():
    X, genes = _cells(n=3, g=10)
    vocab = GeneVocab.from_genes(genes[:5])
    tab = tokenize_csr(
        X.indptr,
        X.indices,
        X.data,
        np.arange(3),
        vocab.lookup(genes),
        TokenizerConfig(),
        vocab.cls_id,
    )
    for rec in tab.to_pylist():
        assert all(vocab.token(t) in genes[:5] for t in rec[keys.GENES][1:])


def test_mid_tie_break_gives_equal_counts_equal_bins():
    # 30 ones, 10 twos, 5 fives in one cell: "random" spreads the ones over many bins, "mid" gives each
    # count one bin, halfway along the bins its quantile edges span.
    counts = np.array([1.0] * 30 + [2.0] * 10 + [5.0] * 5)
    X = sp.csr_matrix(counts[None, :])
    tokens = np.arange(len(counts)) + 3
    bins = {}
    for tie in ("random", "mid"):
        cfg = TokenizerConfig(n_bins=51, max_seq_len=64, tie_break=tie)
        table = tokenize_csr(X.indptr, X.indices, X.data, np.array([0]), tokens, cfg, 1)
        bins[tie] = np.asarray(table["values"][0].as_py()[1:])
    ones_random, ones_mid = bins["random"][:30], bins["mid"][:30]
    assert len(np.unique(ones_random)) > 10
    assert len(np.unique(ones_mid)) == 1 and len(np.unique(bins["mid"][30:40])) == 1
    assert ones_random.min() <= ones_mid[0] <= ones_random.max()
    assert ones_mid[0] < bins["mid"][30] < bins["mid"][40]


def test_unknown_tie_break_is_named():
    with pytest.raises(ValueError, match="tokenizer.tie_break"):
        TokenizerConfig(tie_break="median")


def test_top_selection_keeps_the_most_expressed_genes():
    # 50 genes with counts 1..50 (shuffled columns) keep the 20 highest; 30 genes all at count 3 with
    # max 10 kept choose their 10 by the hashed keys: different cells keep different subsets.
    rng = np.random.default_rng(0)
    counts = rng.permutation(np.arange(1, 51)).astype(float)
    X = sp.csr_matrix(counts[None, :])
    cfg = TokenizerConfig(max_seq_len=21, gene_selection="top")
    genes = tokenize_csr(X.indptr, X.indices, X.data, np.array([0]), np.arange(50) + 3, cfg, 1)
    kept = np.asarray(genes[keys.GENES][0].as_py()[1:]) - 3
    assert sorted(counts[kept]) == list(range(31, 51))
    flat = sp.csr_matrix(np.full((40, 30), 3.0))
    cfg = TokenizerConfig(max_seq_len=11, gene_selection="top")
    tab = tokenize_csr(
        flat.indptr, flat.indices, flat.data, np.arange(40), np.arange(30) + 3, cfg, 1
    )
    subsets = {tuple(g[1:]) for g in tab[keys.GENES].to_pylist()}
    assert all(len(s) == 10 for s in subsets) and len(subsets) > 30


def test_thinned_views_keep_each_count_with_probability_p_per_cell():
    from data_ingest.views import thin_csr

    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (200, 100)).astype(np.float32)
    counts[0, :3] = [500, 1000, 70]  # a few large counts (the normal approximation)
    X = sp.csr_matrix(counts)
    ids, keys_ = np.arange(200) + 1000, np.full(200, 7)
    first, second = (thin_csr(X, 0.5, 0, ids, keys_, v) for v in (0, 1))
    for view in (first, second):
        assert (view.data <= X.data).all() and (view.data >= 0).all()
        assert (view.data == np.rint(view.data)).all()
        assert abs(view.data.sum() / X.data.sum() - 0.5) < 0.01
        assert np.all(
            np.abs(view[0, :3].toarray() - [250, 500, 35]) < 5 * np.sqrt([125, 250, 17.5])
        )
    # Independent views: given the counts, their noise is uncorrelated.
    d1, d2 = first.data - X.data / 2, second.data - X.data / 2
    assert abs(np.corrcoef(d1, d2)[0, 1]) < 0.05
    # A cell's draw depends on its id, key and view only, not on the cells read with it.
    alone = thin_csr(X[5:6], 0.5, 0, ids[5:6], keys_[5:6], 0)
    assert np.array_equal(alone.data, first[5].data)
    assert not np.array_equal(thin_csr(X, 0.5, 0, ids, keys_ + 1, 0).data, first.data)
    # Normalised values (not counts) are kept or dropped whole.
    logs = sp.csr_matrix(np.log1p(counts) + 0.01 * (counts > 0))
    view = thin_csr(logs, 0.5, 0, ids, keys_, 0)
    assert np.all((view.data == 0) | np.isclose(view.data, logs.data))
    assert 0.45 < np.mean(view.data > 0) < 0.55


def test_attach_views_match_cells_and_fall_back_to_the_record():
    from data_ingest.views import attach_views

    X, genes = _cells(n=6)
    vocab = GeneVocab.from_genes(genes)
    cfg = TokenizerConfig(max_seq_len=100)
    args = (X.indices, X.data, np.arange(6) + 10, vocab.lookup(genes), cfg, vocab.cls_id)
    records = tokenize_csr(X.indptr, *args)
    gene_type = records.schema.field(keys.GENES).type
    lost = records.take([4, 2, 0])  # cells 11, 13, 15 lost, the others shuffled
    lost = lost.set_column(0, keys.GENES, pa.array([[vocab.cls_id]] * 3, gene_type))
    out = attach_views(records, [records.take([5, 4, 3, 2, 1, 0]), lost])
    own = records.column(keys.GENES).to_pylist()
    assert out.column(keys.VIEW_GENES[0]).to_pylist() == own
    got = out.column(keys.VIEW_GENES[1]).to_pylist()
    assert [g == [vocab.cls_id] for g in got] == [True, False, True, False, True, False]
    assert [got[i] for i in (1, 3, 5)] == [own[i] for i in (1, 3, 5)]
    assert out.column(keys.VIEW_VALUES[1]).to_pylist()[1] == records[keys.VALUES].to_pylist()[1]


def test_restyled_views_thin_each_gene_towards_a_random_batchs_profile():
    """tokenizer.view_restyle: a view of a cell of batch b takes batch t's gene-wise style (t drawn per
    cell and view), by keeping gene g with probability p x m[t, g] / m[b, g] (at most 1)."""
    from data_ingest.views import batch_log_profile, restyled_keep, thin_csr, thin_streams

    rng = np.random.default_rng(0)
    n, g = 4000, 20
    batch = np.repeat([0, 1], n // 2)
    rate = np.full((2, g), 4.0)
    rate[1, :5] = 16.0  # batch 1 shows genes 0-4 (17 / 5 =) 3.4 times as strongly
    X = sp.csr_matrix(rng.poisson(rate[batch]).astype(np.float32) + 1)  # every gene in every cell
    profile = batch_log_profile(X, batch, 2)
    shift = profile[1] - profile[0]  # per 10,000 counts: the library size moves every gene alike
    assert np.allclose(shift[:5] - shift[5:].mean(), np.log(3.4), atol=0.05)
    assert np.allclose(shift[5:], shift[5:].mean(), atol=0.05)

    ids, keys_ = np.arange(n) + 50, np.zeros(n)
    streams = thin_streams(0, ids, keys_, 0)
    entry_cell = np.repeat(np.arange(n), np.diff(X.indptr))
    keep = restyled_keep(0.2, profile, batch, streams, entry_cell, X.indices)
    first = sp.csr_matrix((keep, X.indices, X.indptr), shape=X.shape).toarray()
    ratio = first[:, 0] / first[:, 10]  # gene 0 against an unshifted gene, per cell
    restyled = ~np.isclose(first[:, 10], 0.2)  # cells that took the other batch's style
    assert 0.45 < restyled.mean() < 0.55  # the style is drawn over both batches
    assert np.allclose(ratio[(batch == 0) & restyled], 3.4, rtol=0.1)
    assert np.allclose(ratio[(batch == 1) & restyled], 1 / 3.4, rtol=0.1)
    assert np.allclose(ratio[~restyled], 1.0)
    assert restyled_keep(0.5, profile, batch, streams, entry_cell, X.indices).max() == 1.0

    view = thin_csr(X, 0.2, 0, ids, keys_, 0, restyle=(profile, batch))
    assert (view.data == np.rint(view.data)).all() and (view.data <= X.data).all()
    up = (batch == 0) & restyled
    kept = np.asarray(view[up][:, :5].sum()) / X[up][:, :5].sum()
    assert abs(kept - first[up, :5].mean()) < 0.02
    # The same cells, ids and keys draw the same views; without restyle, the plain thinning.
    assert np.array_equal(thin_csr(X, 0.2, 0, ids, keys_, 0, (profile, batch)).data, view.data)
    plain = thin_csr(X, 0.2, 0, ids, keys_, 0)
    assert np.array_equal(plain[~restyled].data, view[~restyled].data)
    with pytest.raises(ValueError, match="view_restyle"):
        TokenizerConfig(view_restyle=True)


def test_restyled_depth_is_each_batchs_median_library_size():
    """tokenizer.view_restyle_depth: dataset: the profile also carries each batch's median depth, so a
    view of a cell from a batch sequenced half as deep, restyled towards the deep batch, keeps about twice
    the counts."""
    from data_ingest.views import batch_log_profile, restyled_keep, thin_streams

    rng = np.random.default_rng(1)
    n, g = 4000, 30
    batch = np.repeat([0, 1, 2], [2000, 2000, 0])[:n]  # batch 2 has no cell
    rate = np.full((2, g), 10.0)
    rate[1] *= 2.0  # batch 1: the same genes at twice the depth
    X = sp.csr_matrix(rng.poisson(rate[batch]).astype(np.float32) + 1)
    plain = batch_log_profile(X, batch, 3)
    deep = batch_log_profile(X, batch, 3, depth=True)  # view_restyle_depth: dataset
    assert np.allclose(plain[1] - plain[0], 0.0, atol=0.05)  # per 10,000 counts: no difference
    lib = np.asarray(X.sum(axis=1)).ravel()
    medians = np.median(lib[batch == 0]), np.median(lib[batch == 1])
    assert np.allclose(deep[0] - plain[0], np.log(medians[0] / 1e4), atol=1e-5)
    assert np.allclose(deep[1] - plain[1], np.log(medians[1] / 1e4), atol=1e-5)
    assert np.allclose(deep[1] - deep[0], np.log(21 / 11), atol=0.05)  # (2 x 10 + 1) / (10 + 1)
    assert np.allclose(deep[2] - plain[2], np.log(np.median(lib) / 1e4))  # no cell: overall median

    streams = thin_streams(0, np.arange(n), np.zeros(n), 0)
    entry_cell = np.repeat(np.arange(n), np.diff(X.indptr))
    keep = restyled_keep(0.25, deep[:2], batch, streams, entry_cell, X.indices)
    per_cell = np.bincount(entry_cell, keep, minlength=n) / np.diff(X.indptr)
    to_deep = (batch == 0) & (per_cell > 0.3)  # shallow cells restyled towards the deep batch
    assert 0.4 < to_deep[batch == 0].mean() < 0.6
    assert np.allclose(per_cell[to_deep], 0.25 * medians[1] / medians[0], rtol=0.03)


def test_restyled_depth_per_cell_takes_a_random_cell_of_the_target_batch():
    """tokenizer.view_restyle_depth: cell: a view takes the library size of a random cell of the target
    batch (a quantile of its log library sizes), so a cell's two views share no depth."""
    from data_ingest.views import DEPTH_QUANTILES, batch_log_depths, restyled_keep, thin_streams

    rng = np.random.default_rng(2)
    n, g = 3000, 10
    batch = np.repeat([0, 1], n // 2)
    lib = np.exp(rng.normal(np.where(batch == 0, 6.0, 7.0), 0.3))
    log_depths = batch_log_depths(lib, batch, 3)  # batch 2: no cell, the overall quantiles
    assert log_depths.shape == (3, DEPTH_QUANTILES)
    assert np.allclose(log_depths[0], np.quantile(np.log(lib[:1500]), np.linspace(0, 1, 33)))
    assert np.allclose(log_depths[2], np.quantile(np.log(lib), np.linspace(0, 1, 33)))

    flat = np.zeros((2, g), np.float32)  # the same gene profile: only the depth restyles
    entry_cell = np.repeat(np.arange(n), g)
    cols = np.tile(np.arange(g), n)
    own = np.log(lib)
    taken = []
    for view in (0, 1):
        streams = thin_streams(0, np.arange(n), np.zeros(n), view)
        keep = restyled_keep(0.05, flat, batch, streams, entry_cell, cols, (log_depths[:2], own))
        per_cell = keep.reshape(n, g)[:, 0]
        assert np.allclose(keep.reshape(n, g), per_cell[:, None])  # one factor per cell
        target_log_lib = np.log(per_cell / 0.05) + own  # never clipped at p = 0.05 here
        nearest = np.abs(target_log_lib[:, None] - log_depths[:2].reshape(1, -1)).min(axis=1)
        assert nearest.max() < 1e-4  # always one of the target batches' quantiles
        taken.append(target_log_lib)
    deep = np.abs(taken[0][:, None] - log_depths[1][None, :]).min(axis=1) < 1e-4
    assert 0.4 < deep.mean() < 0.6  # both batches are drawn as targets
    assert np.corrcoef(taken[0], taken[1])[0, 1] < 0.2  # the two views' depths are independent
    with pytest.raises(ValueError, match="view_restyle_depth"):
        TokenizerConfig(thinned_view=0.5, view_restyle=True, view_restyle_depth="median")

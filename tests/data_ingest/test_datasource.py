"""The Ray Data datasource against the SOMA experiment: row count, schema, split, content."""

import numpy as np
import pyarrow as pa
import pytest
import ray

from data_ingest import keys
from data_ingest.datasource import (
    SomaTokenDatasource,
    attach_batch_profile,
    read_token_table,
    record_schema,
)
from data_ingest.source import ALL, HOLDOUT, TRAIN, SomaCellSource, SourceConfig
from data_ingest.tokenize import (
    RECORD_SCHEMA,
    VIEW_COLUMNS,
    TokenizerConfig,
    compact_record_schema,
    record_table,
    widen,
)
from data_ingest.vocab import GeneVocab


def _source(demo_soma):
    src = SomaCellSource(SourceConfig(soma_uri=str(demo_soma), layer="data", holdout_fraction=0.2))
    return src, GeneVocab.from_genes(src.gene_names())


def test_splits_are_disjoint_and_complete(demo_soma):
    src, vocab = _source(demo_soma)
    every = src.resolve(vocab, ALL).joinids
    train, held = src.resolve(vocab, TRAIN).joinids, src.resolve(vocab, HOLDOUT).joinids
    assert len(np.intersect1d(train, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, held])), every)
    assert 0.1 < len(held) / len(every) < 0.3
    assert len(every) == 700 + 300  # pbmc68k_reduced + synthetic


@pytest.mark.slow
def test_datasource_rows_schema_and_content(ray_local, demo_soma):
    src, vocab = _source(demo_soma)
    resolved = src.resolve(vocab, TRAIN)
    tok = TokenizerConfig(max_seq_len=64)
    ds = ray.data.read_datasource(
        SomaTokenDatasource(resolved, tok, vocab.cls_id, cells_per_task=200)
    )
    table = _concat(ds)  # one pass over the data (ds.count() would read it all once more)
    assert table.num_rows == len(resolved.joinids)
    assert table.schema.equals(RECORD_SCHEMA, check_metadata=False)
    assert sorted(table[keys.CELL_ID].to_pylist()) == resolved.joinids.tolist()
    # The same cells read directly tokenize identically (read tasks are deterministic).
    direct = read_token_table(resolved, resolved.joinids[:50], tok, vocab.cls_id)
    by_id = {r[keys.CELL_ID]: r for r in table.to_pylist()}
    for rec in direct.to_pylist():
        assert by_id[rec[keys.CELL_ID]] == rec
    lengths = [len(g) for g in table[keys.GENES].to_pylist()]
    assert max(lengths) <= 64 and min(lengths) >= 2
    assert set(table[keys.BATCH].to_pylist()) == set(range(len(resolved.batch_categories)))


def _concat(ds):
    import pyarrow as pa

    return pa.concat_tables([b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)])


def test_coo_segments_index_unordered_chunked_reads():
    import pyarrow as pa

    from data_ingest.datasource import _coo_arrays, _segments

    rng = np.random.default_rng(0)
    ids = np.array([3, 4, 5, 9, 10, 40, 41, 42, 43, 100])  # runs of consecutive ids
    dense = rng.poisson(0.5, (len(ids), 36)).astype(np.float32)
    dense[:, 30:] = 0
    dense[7] = 0  # a cell without entries
    r, c = np.nonzero(dense)
    perm = rng.permutation(len(r))  # a read returns entries in any order
    rows, cols, vals = ids[r[perm]], c[perm], dense[r[perm], c[perm]]
    # ... and a row in separate stretches, as X's gene tiles give it
    rows, cols = np.r_[np.full(6, ids[2]), rows], np.r_[np.arange(30, 36), cols]
    vals = np.r_[np.ones(6, np.float32), vals]
    dense[2, 30:] = 1.0
    cut = [0, len(rows) // 3, len(rows) // 2, len(rows)]
    tables = [
        pa.Table.from_arrays(
            [pa.chunked_array([rows[a:m], rows[m:b]]), pa.array(cols[a:b]), pa.array(vals[a:b])],
            names=["soma_dim_0", "soma_dim_1", "soma_data"],
        )
        if i
        else pa.table({"soma_dim_0": rows[a:b], "soma_dim_1": cols[a:b], "soma_data": vals[a:b]})
        for i, (a, b) in enumerate(zip(cut[:-1], cut[1:], strict=True))
        for m in [(a + b) // 2]
    ]
    rows2, cols2, vals2 = _coo_arrays(tables)
    assert np.array_equal(rows2, rows) and np.array_equal(cols2, cols)
    seg_ptr, seg_lo, seg_hi = _segments(ids, rows2)
    got = np.zeros_like(dense)
    for i in range(len(ids)):
        entries = np.concatenate(
            [np.arange(seg_lo[s], seg_hi[s]) for s in range(seg_ptr[i], seg_ptr[i + 1])] or [[]]
        ).astype(int)
        assert (rows2[entries] == ids[i]).all()
        # A row's entries keep the order of the read.
        assert np.array_equal(entries, np.flatnonzero(rows2 == ids[i]))
        np.add.at(got[i], cols2[entries], vals2[entries])
    assert np.array_equal(got, dense)
    assert seg_ptr[3] - seg_ptr[2] >= 2  # the stretched row has several segments
    r0, c0, v0 = _coo_arrays([])
    assert len(_segments(ids, r0)[1]) == 0 and len(c0) == len(v0) == 0


@pytest.mark.parametrize(
    "tok",
    [
        TokenizerConfig(max_seq_len=32, min_genes=200),  # truncates every cell, skips a few
        TokenizerConfig(max_seq_len=900, min_genes=5, include_zero_genes=True),  # pads with zeros
    ],
)
def test_read_token_table_matches_reference_in_any_order(demo_soma, tok):
    import tiledbsoma

    from data_ingest.tokenize import TokenizeStats
    from data_ingest.tokenize_reference import tokenize_csr_reference

    src, vocab = _source(demo_soma)
    res = src.resolve(vocab, ALL)
    ids = res.joinids[::3][:120]
    stats = TokenizeStats()
    plain = read_token_table(res, ids, tok, vocab.cls_id, stats=stats, io_cells=7)
    with tiledbsoma.Experiment.open(str(demo_soma)) as exp:
        X = exp.ms[res.measurement].X[res.layer]
        m = X.read(coords=(ids,)).coos().concat().to_scipy().tocsr()[ids]
        obs = exp.obs.read(coords=(ids,), column_names=[res.batch_key]).concat().to_pandas()
    batch = np.array([res.batch_categories.index(b) for b in obs[res.batch_key]])
    ref_stats = TokenizeStats()
    ref = tokenize_csr_reference(
        m.indptr,
        m.indices,
        m.data,
        ids,
        res.feature_tokens,
        tok,
        vocab.cls_id,
        batch=batch,
        stats=ref_stats,
    )
    got = plain.drop_columns([keys.LABEL])
    assert got.equals(ref.drop_columns([keys.LABEL]))
    assert stats == ref_stats
    # The compact records the stream ships hold the same tokens in 3 bytes instead of 6; X queries on three
    # threads (18 queries of 7 cells, three in flight at once) change nothing.
    compact = read_token_table(res, ids, tok, vocab.cls_id, io_cells=7, compact=True, readers=3)
    assert compact.schema == record_schema(res, tok, vocab.cls_id) != RECORD_SCHEMA
    assert compact.schema.field(keys.GENES).type == pa.list_(pa.uint16())
    assert compact.schema.field(keys.VALUES).type == pa.list_(pa.int8())
    assert widen(compact).equals(plain)
    if tok.include_zero_genes:  # short cells were padded with unexpressed genes
        assert any(0 in v[1:] for v in plain[keys.VALUES].to_pylist())
    else:
        assert stats.skipped_few_genes > 0 and stats.truncated > 0
    # With an order key the same records come out in key order (the stream's shuffled positions).
    key = np.random.default_rng(0).permutation(len(ids))
    ordered = read_token_table(res, ids, tok, vocab.cls_id, io_cells=7, order_key=key, readers=2)
    kept = np.isin(ids, plain[keys.CELL_ID].to_numpy())
    want = ids[np.argsort(np.where(kept, key, len(ids)))][: kept.sum()]
    assert ordered[keys.CELL_ID].to_numpy().tolist() == want.tolist()
    by_id = {r[keys.CELL_ID]: r for r in plain.to_pylist()}
    assert [by_id[r[keys.CELL_ID]] for r in ordered.to_pylist()] == ordered.to_pylist()


def test_compact_record_schema_picks_the_narrowest_types_that_fit():
    def types(n_tokens, n_bins):
        schema = compact_record_schema(n_tokens, n_bins)
        return schema.field(keys.GENES).type.value_type, schema.field(keys.VALUES).type.value_type

    assert types(2**16, 127) == (pa.uint16(), pa.int8())
    assert types(2**16 + 1, 128) == (pa.int32(), pa.int16())
    # Ids and values at the edges survive the round trip to RECORD_SCHEMA.
    genes, values = np.array([0, 2**16 - 1], np.uint16), np.array([keys.PAD_VALUE, 126], np.int8)
    table = record_table(
        np.array([0, 2]),
        genes,
        values,
        np.array([7]),
        np.array([0]),
        np.array([-1]),
        schema=compact_record_schema(2**16, 127),
    )
    wide = widen(table)
    assert wide.schema == RECORD_SCHEMA
    assert wide[keys.GENES].to_pylist() == [[0, 2**16 - 1]]
    assert wide[keys.VALUES].to_pylist() == [[keys.PAD_VALUE, 126]]
    assert widen(wide) is wide


def test_thinned_views_are_deterministic_subsets_drawn_anew_each_epoch(demo_soma):
    """tokenizer.thinned_view: each record carries two more records of the cell, each tokenised from an
    independently thinned copy of its values: their genes are the cell's own, they are the same on a
    re-read (a resume) and others when the cell's position in the epoch changes; the main record does not
    change at all."""
    src, vocab = _source(demo_soma)
    resolved = src.resolve(vocab, TRAIN)
    ids = resolved.joinids[:200]
    plain = TokenizerConfig(max_seq_len=1000)  # every expressed gene
    tok = TokenizerConfig(max_seq_len=1000, thinned_view=0.5)
    records = read_token_table(resolved, ids, plain, vocab.cls_id)
    # Only the training stream asks for views; evaluation reads the records alone.
    assert read_token_table(resolved, ids, tok, vocab.cls_id).equals(records)
    kw = dict(order_key=np.arange(200), views=True)
    table = read_token_table(resolved, ids, tok, vocab.cls_id, **kw)
    assert table.select(records.column_names).equals(records)
    assert table.schema.equals(record_schema(resolved, tok, vocab.cls_id, False, views=True))
    full = table[keys.GENES].to_pylist()
    one, two = (table[g].to_pylist() for g in keys.VIEW_GENES)
    # The demo's values are log-normalised: each view keeps each gene whole with p = 0.5.
    assert all(
        set(a) <= set(f) and set(b) <= set(f) for f, a, b in zip(full, one, two, strict=True)
    )
    for view in (one, two):
        kept = np.mean([(len(v) - 1) / (len(f) - 1) for f, v in zip(full, view, strict=True)])
        assert 0.4 < kept < 0.6
    assert one != two
    again = read_token_table(resolved, ids, tok, vocab.cls_id, **kw)
    assert again.equals(table)
    moved = read_token_table(
        resolved, ids, tok, vocab.cls_id, order_key=kw["order_key"] + 7, views=True
    )
    assert moved[keys.VIEW_GENES[0]].to_pylist() != one
    compact = read_token_table(resolved, ids, tok, vocab.cls_id, compact=True, **kw)
    assert widen(compact).equals(table)


def test_shorter_views_keep_their_most_expressed_genes(demo_soma):
    """tokenizer.view_max_seq_len: each view is its thinned counts tokenised with that many tokens (its
    top genes), the main record keeps max_seq_len; a view length over max_seq_len is a config error."""
    src, vocab = _source(demo_soma)
    resolved = src.resolve(vocab, TRAIN)
    ids = resolved.joinids[:100]
    kw = dict(order_key=np.arange(100), views=True)
    full = TokenizerConfig(max_seq_len=1000, thinned_view=0.5)
    short = TokenizerConfig(max_seq_len=1000, thinned_view=0.5, view_max_seq_len=16)
    long_table = read_token_table(resolved, ids, full, vocab.cls_id, **kw)
    table = read_token_table(resolved, ids, short, vocab.cls_id, **kw)
    main = [c for c in table.column_names if c not in VIEW_COLUMNS]
    assert table.select(main).equals(long_table.select(main))
    for g, v in zip(keys.VIEW_GENES, keys.VIEW_VALUES, strict=True):
        genes, values = table[g].to_pylist(), table[v].to_pylist()
        all_genes, all_values = long_table[g].to_pylist(), long_table[v].to_pylist()
        assert max(map(len, genes)) == 16 and max(map(len, all_genes)) > 16
        for kept, vals, every, every_vals in zip(genes, values, all_genes, all_values, strict=True):
            assert set(kept) <= set(every) and len(kept) == min(16, len(every))
            # the kept genes are the view's most expressed: none left out is above the lowest kept
            left_out = [b for gene, b in zip(every, every_vals, strict=True) if gene not in kept]
            assert not left_out or max(left_out) <= min(vals[1:]) + 1e-6
    with pytest.raises(ValueError, match="view_max_seq_len"):
        TokenizerConfig(max_seq_len=64, view_max_seq_len=128)


def test_restyled_views_need_the_batch_profile_and_leave_the_record_alone(demo_soma):
    """tokenizer.view_restyle: the views are thinned towards random batches' profiles
    (`attach_batch_profile`, one per batch over the training cells); the main record is unchanged and a
    source without the profile is refused."""
    src, vocab = _source(demo_soma)
    resolved = src.resolve(vocab, TRAIN)
    ids = resolved.joinids[:200]
    kw = dict(order_key=np.arange(200), views=True)
    plain = TokenizerConfig(max_seq_len=1000, thinned_view=0.5)
    tok = TokenizerConfig(max_seq_len=1000, thinned_view=0.5, view_restyle=True)
    with pytest.raises(ValueError, match="batch_log_profile"):
        read_token_table(resolved, ids, tok, vocab.cls_id, **kw)
    styled = attach_batch_profile(resolved)  # view_restyle_depth: dataset, the default
    profile = styled.batch_log_profile
    assert profile.shape == (len(resolved.batch_categories), len(resolved.feature_tokens))
    assert np.isfinite(profile).all() and len(resolved.batch_categories) > 1
    assert styled.batch_log_depths is None
    # view_restyle_depth: cell also keeps each batch's library-size quantiles, and needs them.
    per_cell = attach_batch_profile(resolved, depth="cell")
    assert per_cell.batch_log_depths.shape[0] == len(resolved.batch_categories)
    assert np.isfinite(per_cell.batch_log_depths).all()
    tok_cell = TokenizerConfig(
        max_seq_len=1000, thinned_view=0.5, view_restyle=True, view_restyle_depth="cell"
    )
    with pytest.raises(ValueError, match="batch_log_depths"):
        read_token_table(styled, ids, tok_cell, vocab.cls_id, **kw)
    cell_views = read_token_table(per_cell, ids, tok_cell, vocab.cls_id, **kw)
    main = [c for c in cell_views.column_names if c not in VIEW_COLUMNS]
    assert cell_views.select(main).equals(
        read_token_table(per_cell, ids, plain, vocab.cls_id, **kw).select(main)
    )
    before = read_token_table(styled, ids, plain, vocab.cls_id, **kw)
    table = read_token_table(styled, ids, tok, vocab.cls_id, **kw)
    main = [c for c in table.column_names if c not in VIEW_COLUMNS]
    assert table.select(main).equals(before.select(main))
    assert table[keys.VIEW_GENES[0]].to_pylist() != before[keys.VIEW_GENES[0]].to_pylist()
    full = table[keys.GENES].to_pylist()
    for g in keys.VIEW_GENES:
        assert all(set(v) <= set(f) for f, v in zip(full, table[g].to_pylist(), strict=True))
    assert read_token_table(styled, ids, tok, vocab.cls_id, **kw).equals(table)


def test_coo_segments_long_stretches_match_a_plain_scan():
    from data_ingest.datasource import _segments

    rng = np.random.default_rng(1)
    ids = np.unique(rng.choice(5000, 300, replace=False))
    # Stretches of 1-70 entries (the kernel compares 16 at a time), a row often in several of them,
    # sometimes twice in a row (one stretch then), and stretches that end the read at any length.
    for n_stretches in (1, 7, 400, 2000):
        owners = rng.choice(ids, n_stretches)
        rows = np.repeat(owners, rng.integers(1, 71, n_stretches))
        seg_ptr, seg_lo, seg_hi = _segments(ids, rows)
        for i, cell in enumerate(ids):
            want = np.flatnonzero(rows == cell)
            got = [np.arange(seg_lo[s], seg_hi[s]) for s in range(seg_ptr[i], seg_ptr[i + 1])]
            assert all(len(g) for g in got)
            assert np.array_equal(np.concatenate(got or [np.zeros(0, int)]), want)
            # maximal stretches: consecutive segments of a row do not touch
            assert all(seg_hi[s] < seg_lo[s + 1] for s in range(seg_ptr[i], seg_ptr[i + 1] - 1))


def test_query_bounds_keep_each_query_within_the_result_buffers():
    from data_ingest.datasource import query_bounds, x_buffer_entries

    assert x_buffer_entries(None) == (1 << 30) // 8
    assert x_buffer_entries({"soma.init_buffer_bytes": str(24 << 20)}) == 3 << 20
    # Without per-cell entry counts: io_cells at a time.
    assert query_bounds(5000, 2048, None, 100).tolist() == [0, 2048, 4096, 5000]
    assert query_bounds(0, 2048, np.zeros(0, np.int64), 100).tolist() == [0]
    rng = np.random.default_rng(0)
    nnz = rng.integers(0, 4000, 10_000)
    nnz[123] = 10**6  # a cell larger than the buffers is read alone
    room = 1_000_000
    b = query_bounds(len(nnz), 2048, nnz, room)
    assert b[0] == 0 and b[-1] == len(nnz) and (np.diff(b) > 0).all() and (np.diff(b) <= 2048).all()
    for lo, hi in zip(b[:-1], b[1:], strict=True):
        assert hi - lo == 1 or nnz[lo:hi].sum() <= 0.9 * room
        # greedy: one more cell would not have fitted (or the query is full)
        assert hi == len(nnz) or hi - lo == 2048 or nnz[lo : hi + 1].sum() > 0.9 * room
    assert [123, 124] in [[int(lo), int(hi)] for lo, hi in zip(b[:-1], b[1:], strict=True)]

"""The Ray Data datasource against the SOMA experiment: row count, schema, split, content."""

import numpy as np
import ray

from data_ingest import keys
from data_ingest.datasource import SomaTokenDatasource, read_token_table
from data_ingest.source import ALL, HOLDOUT, TRAIN, SomaCellSource, SourceConfig
from data_ingest.tokenize import RECORD_SCHEMA, TokenizerConfig
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


def test_coo_to_csr_from_unordered_chunked_reads():
    import pyarrow as pa
    import scipy.sparse as sp

    from data_ingest.datasource import _coo_to_csr

    rng = np.random.default_rng(0)
    ids = np.array([3, 4, 5, 9, 10, 40, 41, 42, 43, 100])  # runs of consecutive ids
    dense = rng.poisson(0.5, (len(ids), 30)).astype(np.float32)
    r, c = np.nonzero(dense)
    perm = rng.permutation(len(r))  # a read returns entries in any order
    rows, cols, vals = ids[r[perm]], c[perm], dense[r[perm], c[perm]]
    cut = [0, len(r) // 3, len(r) // 2, len(r)]
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
    indptr, out_cols, out_vals = _coo_to_csr(ids, tables)
    got = sp.csr_matrix((out_vals, out_cols, indptr), shape=dense.shape).toarray()
    assert np.array_equal(got, dense)
    # Within a row, entries keep the order of the read.
    for i in range(len(ids)):
        seen = cols[rows == ids[i]]
        assert np.array_equal(out_cols[indptr[i] : indptr[i + 1]], seen)
    empty = _coo_to_csr(ids, [])
    assert np.array_equal(empty[0], np.zeros(len(ids) + 1)) and len(empty[1]) == 0

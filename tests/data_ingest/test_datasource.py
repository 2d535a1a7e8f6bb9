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

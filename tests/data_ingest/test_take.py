import numpy as np
import pyarrow as pa
import pytest

from data_ingest.take import take_records


def _records(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, n)
    genes = [rng.integers(0, 60000, k).astype(np.uint16) for k in lengths]
    return pa.table(
        {
            "genes": pa.array(genes, pa.list_(pa.uint16())),
            "values": pa.array([g.astype(np.int8) % 51 for g in genes], pa.list_(pa.int8())),
            "cell_id": pa.array(np.arange(n) * 7, pa.int64()),
            "label": pa.array(rng.integers(0, 5, n), pa.int32()),
        }
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_take_records_equals_arrow_take(threads):
    table = _records(500, 0)
    rng = np.random.default_rng(1)
    # A permutation, repeated rows, a few rows, and from several chunks and a slice.
    for rows in (rng.permutation(500), rng.integers(0, 500, 800), np.array([499, 0, 3])):
        assert take_records(table, rows, threads).equals(table.take(pa.array(rows)))
    chunked = pa.concat_tables([table.slice(0, 200), _records(300, 2), table.slice(450)])
    rows = rng.permutation(chunked.num_rows)
    assert take_records(chunked, rows, threads).equals(chunked.take(pa.array(rows)))
    assert take_records(table, np.zeros(0, np.int64)).num_rows == 0
    assert take_records(table.slice(0, 0), np.zeros(0, np.int64)).schema == table.schema


def test_take_records_keeps_nulls_through_arrow_take():
    table = pa.table({"genes": pa.array([[1, 2], None, [3]], pa.list_(pa.uint16()))})
    rows = np.array([2, 1, 0])
    assert take_records(table, rows).equals(table.take(pa.array(rows)))

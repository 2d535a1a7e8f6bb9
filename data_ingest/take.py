"""Reordering token records: `take_records(table, rows)`, a compiled gather of their list columns.

Arrow's `take` builds a list column's output value by value: reordering 16,384 cached records of ~850 tokens
(one read task's worth) took 0.6 s, longer than reading them from the cache. A record's tokens are one
contiguous run, so the gather here copies one run per record (a memcpy each, compiled, without the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pyarrow as pa


@numba.njit(cache=True, nogil=True)
def _gather_runs(offsets, values, rows, out_offsets, out_values):
    """out_values[out_offsets[i]:out_offsets[i + 1]] = values[offsets[rows[i]]:offsets[rows[i] + 1]]."""
    for i in range(len(rows)):
        a, b = offsets[rows[i]], offsets[rows[i] + 1]
        out_values[out_offsets[i] : out_offsets[i + 1]] = values[a:b]


def _take_list(col: pa.ListArray, rows: np.ndarray) -> pa.ListArray:
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)[rows]
    out_offsets = np.zeros(len(rows) + 1, offsets.dtype)
    np.cumsum(lengths, out=out_offsets[1:])
    out_values = np.empty(int(out_offsets[-1]), values.dtype)
    _gather_runs(offsets, values, rows, out_offsets, out_values)
    return pa.ListArray.from_arrays(
        pa.array(out_offsets), pa.array(out_values, col.type.value_type)
    )


def take_records(table: pa.Table, rows: np.ndarray, threads: int = 1) -> pa.Table:
    """`table.take(rows)`: list columns (without nulls, of fixed-width values) gathered run by run, the
    other columns with Arrow's take; columns on up to `threads` threads."""
    table = table.combine_chunks()
    rows = np.asarray(rows, np.int64)
    index = pa.array(rows)

    def column(i: int) -> pa.Array:
        col = table.column(i).chunk(0) if table.column(i).num_chunks else table.column(i)
        if (
            isinstance(col, pa.ListArray)
            and col.null_count == 0
            and pa.types.is_primitive(col.type.value_type)
            and not pa.types.is_boolean(col.type.value_type)
        ):
            return _take_list(col, rows)
        return table.column(i).take(index)

    if not table.num_rows or not len(rows):
        return table.take(index)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="take") as pool:
        cols = list(pool.map(column, range(table.num_columns)))
    return pa.Table.from_arrays(cols, schema=table.schema)

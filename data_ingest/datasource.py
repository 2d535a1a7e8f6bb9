"""A Ray Data datasource that reads cells from a SOMA experiment and yields token records.

One read task per contiguous chunk of the selected soma_joinids; each task opens the experiment, reads its
cells' obs and X rows, and tokenizes them (binning and gene selection happen here, in the read tasks, never on
the training workers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from data_ingest import keys
from data_ingest.source import ResolvedSource, open_experiment
from data_ingest.tokenize import RECORD_SCHEMA, TokenizerConfig, TokenizeStats, tokenize_csr
from data_ingest.tokenize_kernel import row_positions, scatter_rows

IO_CELLS = 2048
"""Cells per X read query inside a read task: bounds the raw (COO) data held at once, whatever the task size."""


def read_token_table(
    src: ResolvedSource,
    joinids: np.ndarray,
    tok: TokenizerConfig,
    cls_id: int,
    stats: TokenizeStats | None = None,
    io_cells: int = IO_CELLS,
) -> pa.Table:
    """Read and tokenize the cells `joinids` (sorted) of `src`, `io_cells` at a time."""
    joinids = np.asarray(joinids, dtype=np.int64)
    parts = []
    with open_experiment(src.soma_uri, src.tiledb_config) as exp:
        obs_cols = [keys.SOMA_JOINID, src.batch_key] + ([src.label_key] if src.label_key else [])
        obs = exp.obs.read(coords=(joinids,), column_names=obs_cols).concat().to_pandas()
        obs = obs.set_index(keys.SOMA_JOINID).reindex(joinids)
        batch = pd.Categorical(
            obs[src.batch_key].astype(str), categories=src.batch_categories
        ).codes
        labels = None
        if src.label_key:
            labels = pd.Categorical(
                obs[src.label_key].astype(str), categories=src.label_categories
            ).codes
        X = exp.ms[src.measurement].X[src.layer]
        for lo in range(0, len(joinids), io_cells):
            ids = joinids[lo : lo + io_cells]
            coo = list(X.read(coords=(ids,)).tables())
            indptr, cols, vals = _coo_to_csr(ids, coo)
            parts.append(
                tokenize_csr(
                    indptr,
                    cols,
                    vals,
                    ids,
                    src.feature_tokens,
                    tok,
                    cls_id,
                    batch=batch[lo : lo + io_cells],
                    labels=None if labels is None else labels[lo : lo + io_cells],
                    stats=stats,
                )
            )
    if not parts:
        return RECORD_SCHEMA.empty_table()
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts)


def _coo_to_csr(ids: np.ndarray, coo: list[pa.Table]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, columns, values) over the rows `ids` (sorted, unique) of a SOMA X read in any order.

    `coo` is the read's result tables (processed chunk by chunk, never concatenated). Entries of a row keep
    their order in the read.
    """
    chunks = []
    for t in coo:
        t = t.select(["soma_dim_0", "soma_dim_1", "soma_data"])
        if len({tuple(len(c) for c in col.chunks) for col in t.columns}) > 1:
            t = t.combine_chunks()  # columns chunked differently (SOMA reads never are)
        chunks += [
            (r.to_numpy(), c.to_numpy(), v.to_numpy())
            for r, c, v in zip(*(col.chunks for col in t.columns), strict=True)
        ]
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    starts = np.flatnonzero(np.diff(ids, prepend=ids[:1] - 2) != 1) if n else np.zeros(0, int)
    run_ids = ids[starts] if n else np.zeros(1, np.int64)
    run_pos = np.append(starts, n).astype(np.int64) if n else np.zeros(2, np.int64)
    counts = np.zeros(n + 1, np.int64)
    positions = [row_positions(r, run_ids, run_pos, counts[1:]) for r, _, _ in chunks]
    indptr = np.cumsum(counts)
    cols = np.empty(indptr[-1], np.int32)
    vals = np.empty(indptr[-1], chunks[0][2].dtype if chunks else np.float32)
    fill = indptr[:-1].copy()
    for pos, (_, c, v) in zip(positions, chunks, strict=True):
        scatter_rows(pos, c, v, fill, cols, vals)
    return indptr, cols, vals


class SomaTokenDatasource(Datasource):
    """Ray Data source of token records for the cells of a `ResolvedSource`."""

    def __init__(
        self, src: ResolvedSource, tok: TokenizerConfig, cls_id: int, cells_per_task: int = 2048
    ):
        self.src = src
        self.tok = tok
        self.cls_id = cls_id
        self.cells_per_task = cells_per_task

    def estimate_inmemory_data_size(self) -> int:
        return len(self.src.joinids) * self.tok.max_seq_len * 6

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit=None, data_context=None
    ) -> list[ReadTask]:
        n = len(self.src.joinids)
        n_tasks = max(1, -(-n // self.cells_per_task))
        chunks = np.array_split(self.src.joinids, n_tasks)
        # Each task carries only its own chunk of cell ids, not the whole selection.
        src = dataclasses.replace(self.src, joinids=np.zeros(0, dtype=np.int64))
        tok, cls_id = self.tok, self.cls_id

        def make(chunk: np.ndarray) -> ReadTask:
            def read() -> Iterator[pa.Table]:
                yield read_token_table(src, chunk, tok, cls_id)

            meta = BlockMetadata(
                num_rows=None,
                size_bytes=len(chunk) * tok.max_seq_len * 6,
                exec_stats=None,
                input_files=None,
            )
            return ReadTask(read, meta, schema=RECORD_SCHEMA, per_task_row_limit=per_task_row_limit)

        return [make(c) for c in chunks if len(c)]

    def get_name(self) -> str:
        return "SomaTokens"

"""A Ray Data datasource that reads cells from a SOMA experiment and yields token records.

One read task per contiguous chunk of the selected soma_joinids; each task opens the experiment, reads its
cells' obs and X rows, and tokenizes them (binning and gene selection happen here, in the read tasks, never on
the training workers).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from data_ingest import keys
from data_ingest.source import ResolvedSource, open_experiment
from data_ingest.tokenize import (
    RECORD_SCHEMA,
    TOKEN_COLUMNS,
    VIEW_COLUMNS,
    TokenizerConfig,
    TokenizeStats,
    check_values,
    compact_record_schema,
    record_table,
    tokenize_segments_into,
)
from data_ingest.tokenize_kernel import compact_slots, coo_segments, thin_segments
from data_ingest.views import (
    attach_views,
    batch_log_depths,
    batch_log_profile,
    restyled_keep,
    thin_streams,
    view_tokenizer,
)

log = logging.getLogger(__name__)

IO_CELLS = 2048
"""Cells per X read query inside a read task: bounds the raw (COO) data held at once, whatever the task size."""
SLOT_CELLS = 32768
"""Cells `read_token_table` tokenizes into one set of slots when no output order is asked for."""


def x_buffer_entries(tiledb_config: dict[str, str] | None) -> int:
    """Entries of an X query's result that fit its buffers at once: `soma.init_buffer_bytes` (TileDB-SOMA's
    default: 1 GiB) per column, 8 bytes per coordinate."""
    return int((tiledb_config or {}).get("soma.init_buffer_bytes", 1 << 30)) // 8


def query_bounds(n: int, io_cells: int, nnz: np.ndarray | None, buffer_entries: int) -> np.ndarray:
    """Start offsets of the X queries over `n` sorted cells, then `n`: `io_cells` cells each, fewer where
    the cells' entries (`nnz`, the census's obs column, when known) would not fit the result buffers in
    one go (90% of `buffer_entries`). A query that overflows them comes back in several rounds whose
    columns are then joined by a copy: at 20,000 genes (~1,800 entries a cell) a 2,048-cell query
    took two rounds of the read workers' 24 MiB buffers (`stream.read.X_BUFFER_BYTES`), and joining
    them was 0.15 s of a 16,384-cell task's 1.6 CPU-s; 1,024-cell queries fit (task CPU -6 to -8%)."""
    if nnz is None or not n:
        return np.append(np.arange(0, n, io_cells), n).astype(np.int64)
    room = max(1, int(buffer_entries * 0.9))
    bounds, lo = [0], 0
    csum = np.concatenate(([0], np.cumsum(nnz)))
    while lo < n:
        # the most cells from `lo` whose entries fit (at least one), at most io_cells
        fit = int(np.searchsorted(csum, csum[lo] + room, side="right")) - 1
        lo = min(n, lo + io_cells, max(lo + 1, fit))
        bounds.append(lo)
    return np.asarray(bounds, np.int64)


def read_token_table(
    src: ResolvedSource,
    joinids: np.ndarray,
    tok: TokenizerConfig,
    cls_id: int,
    stats: TokenizeStats | None = None,
    io_cells: int = IO_CELLS,
    order_key: np.ndarray | None = None,
    compact: bool = False,
    readers: int = 1,
    views: bool = False,
) -> pa.Table:
    """Read and tokenize the cells `joinids` (sorted) of `src`, at most `io_cells` at a time (fewer where
    their entries would overflow the query buffers, `query_bounds`), the X queries on `readers` threads
    ahead of the tokenizer.

    Records come in `joinids` order, or with `order_key` (one number per cell) in increasing key order
    (ties keep `joinids` order): the stream asks for its shuffled positions this way instead of reordering
    the table afterwards. Each cell's record is written straight to a slot of `max_seq_len` entries in
    output order and the slots are closed up at the end, so the records are built once, in place; the
    working memory is `len(joinids) x max_seq_len x 6` bytes (split a long unordered request:
    `SLOT_CELLS` cells at a time). With `compact`, the records have `record_schema(src, tok, cls_id,
    compact=True)`'s narrower token types (and the working memory shrinks with them). With `views`
    and `tok.thinned_view` (the training stream asks for them; evaluation and caches never need them),
    each cell's two thinned copies are tokenised into slots of their own (three times the working memory)
    and attached as `VIEW_COLUMNS` (`attach_views`).
    """
    schema = record_schema(src, tok, cls_id, compact, views)
    if (
        views
        and tok.view_restyle
        and tok.view_restyle_depth == "cell"
        and src.batch_log_profile is not None
        and src.batch_log_depths is None
    ):
        raise ValueError(
            "tokenizer.view_restyle_depth: cell needs each batch's library sizes on the source "
            "(ResolvedSource.batch_log_depths, set by data_ingest.datasource.attach_batch_profile "
            "with depth='cell')"
        )
    if views and tok.view_restyle and src.batch_log_profile is None:
        raise ValueError(
            "tokenizer.view_restyle needs each batch's expression profile on the source "
            "(ResolvedSource.batch_log_profile, set by data_ingest.datasource.attach_batch_profile)"
        )
    joinids = np.asarray(joinids, dtype=np.int64)
    stats = stats if stats is not None else TokenizeStats()
    if order_key is None and len(joinids) > SLOT_CELLS:
        return pa.concat_tables(
            [
                read_token_table(
                    src,
                    joinids[lo : lo + SLOT_CELLS],
                    tok,
                    cls_id,
                    stats,
                    io_cells,
                    compact=compact,
                    readers=readers,
                    views=views,
                )
                for lo in range(0, len(joinids), SLOT_CELLS)
            ]
        )
    n, stride = len(joinids), tok.max_seq_len
    if not n:
        return schema.empty_table()
    slot = np.arange(n)  # output place of each cell
    if order_key is not None:
        slot[np.argsort(np.asarray(order_key), kind="stable")] = np.arange(n)
    starts = slot * stride
    genes = np.empty(n * stride, schema.field(keys.GENES).type.value_type.to_pandas_dtype())
    values = np.empty(n * stride, schema.field(keys.VALUES).type.value_type.to_pandas_dtype())
    lengths = np.empty(n, np.int64)
    view_slots = []
    if VIEW_COLUMNS[0] in schema.names:  # slots of the two views' records, in the same places
        view_slots = [
            (np.empty_like(genes), np.empty_like(values), np.empty(n, np.int64)) for _ in range(2)
        ]
    with open_experiment(src.soma_uri, src.tiledb_config) as exp:
        obs_cols = [keys.SOMA_JOINID, src.batch_key] + ([src.label_key] if src.label_key else [])
        has_nnz = keys.OBS_NNZ in exp.obs.schema.names and keys.OBS_NNZ not in obs_cols
        obs = exp.obs.read(
            coords=(joinids,), column_names=obs_cols + ([keys.OBS_NNZ] if has_nnz else [])
        )
        obs = obs.concat().to_pandas().set_index(keys.SOMA_JOINID).reindex(joinids)
        nnz = obs[keys.OBS_NNZ].to_numpy() if has_nnz else None
        if nnz is not None and (nnz.dtype.kind not in "iu" or (nnz < 0).any()):
            nnz = None  # not counts (nulls, another meaning): it only sizes the queries
        bounds = query_bounds(n, io_cells, nnz, x_buffer_entries(src.tiledb_config))
        batch = pd.Categorical(
            obs[src.batch_key].astype(str), categories=src.batch_categories
        ).codes.astype(np.int32)
        labels = np.full(n, -1, np.int32)
        if src.label_key:
            labels = pd.Categorical(
                obs[src.label_key].astype(str), categories=src.label_categories
            ).codes.astype(np.int32)
        # X queries run on `readers` threads, each with its own handle, `readers` queries ahead of this
        # thread's tokenizing: TileDB's decoding and the tokenizer both let go of the GIL, so one read task
        # keeps several cores busy and holds `readers + 1` queries' COO data at most.
        local, handles = threading.local(), []

        def read_x(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if not hasattr(local, "X"):
                local.exp = open_experiment(src.soma_uri, src.tiledb_config)
                handles.append(local.exp)
                local.X = local.exp.ms[src.measurement].X[src.layer]
            ids = joinids[lo:hi]
            # A run of consecutive ids is read as a range: TileDB decodes it ~4% cheaper than points.
            run = ids[-1] - ids[0] == len(ids) - 1
            coords = (slice(int(ids[0]), int(ids[-1])),) if run else (ids,)
            return _coo_arrays(list(local.X.read(coords=coords).tables()))

        try:
            with ThreadPoolExecutor(readers, thread_name_prefix="soma-x") as pool:
                ahead = list(zip(bounds[:-1], bounds[1:], strict=True))
                pending = collections.deque(pool.submit(read_x, *q) for q in ahead[:readers])
                for k, (lo, hi) in enumerate(ahead):
                    ids = joinids[lo:hi]
                    rows, cols, vals = pending.popleft().result()
                    if k + readers < len(ahead):
                        pending.append(pool.submit(read_x, *ahead[k + readers]))
                    check_values(vals)
                    segments = _segments(ids, rows)
                    tokenize_segments_into(
                        *segments,
                        cols,
                        vals,
                        ids,
                        src.feature_tokens,
                        tok,
                        cls_id,
                        stats,
                        starts[lo:hi],
                        genes,
                        values,
                        lengths[lo:hi],
                    )
                    if view_slots:
                        # Each cell's draws come from its id and (in the stream) its position in the
                        # epoch: other views each epoch, the same ones on a resume.
                        epoch_keys = np.zeros(hi - lo) if order_key is None else order_key[lo:hi]
                        thinned = np.empty(len(vals), np.float32)
                        view_tok = view_tokenizer(tok)
                        depth = None
                        if tok.view_restyle:
                            entry_cell = np.searchsorted(ids, rows)
                            if tok.view_restyle_depth == "cell":
                                lib = np.bincount(entry_cell, vals, minlength=hi - lo)
                                depth = (src.batch_log_depths, np.log(np.maximum(lib, 1.0)))
                        for v, (v_genes, v_values, v_lengths) in enumerate(view_slots):
                            streams = thin_streams(tok.seed, ids, epoch_keys, v)
                            if tok.view_restyle:
                                keep = restyled_keep(
                                    tok.thinned_view,
                                    src.batch_log_profile,
                                    batch[lo:hi],
                                    streams,
                                    entry_cell,
                                    cols,
                                    depth,
                                )
                            else:
                                keep = np.full(len(vals), tok.thinned_view)
                            thin_segments(*segments, cols, vals, streams, keep, thinned)
                            tokenize_segments_into(
                                *segments,
                                cols,
                                thinned,
                                ids,
                                src.feature_tokens,
                                view_tok,
                                cls_id,
                                TokenizeStats(),
                                starts[lo:hi],
                                v_genes,
                                v_values,
                                v_lengths[lo:hi],
                            )
        finally:
            for h in handles:
                h.close()
    cell_at = np.empty(n, np.int64)  # cell in each slot
    cell_at[slot] = np.arange(n)
    base = pa.schema([f for f in schema if f.name not in VIEW_COLUMNS])
    table = _slot_records(genes, values, lengths, cell_at, stride, joinids, batch, labels, base)
    if not view_slots:
        return table
    thinned = [_slot_records(*v, cell_at, stride, joinids, batch, labels, base) for v in view_slots]
    return attach_views(table, thinned)


def _slot_records(
    genes: np.ndarray,
    values: np.ndarray,
    lengths: np.ndarray,
    cell_at: np.ndarray,
    stride: int,
    joinids: np.ndarray,
    batch: np.ndarray,
    labels: np.ndarray,
    schema: pa.Schema,
) -> pa.Table:
    """The records written to slots of `stride` entries (`cell_at`: the cell in each slot; `lengths`
    per cell, 0 = skipped), closed up in place."""
    slot_lengths = lengths[cell_at]
    total = compact_slots(genes, values, stride, slot_lengths)
    kept = slot_lengths > 0
    offsets = np.zeros(int(kept.sum()) + 1, np.int64)
    np.cumsum(slot_lengths[kept], out=offsets[1:])
    cells = cell_at[kept]
    return record_table(
        offsets,
        genes[:total],
        values[:total],
        joinids[cells],
        batch[cells],
        labels[cells],
        schema=schema,
    )


def record_schema(
    src: ResolvedSource,
    tok: TokenizerConfig,
    cls_id: int,
    compact: bool = True,
    views: bool = False,
) -> pa.Schema:
    """The schema of `read_token_table`'s records: `RECORD_SCHEMA`, or with `compact` the narrowest token
    types for this vocabulary (every id `src.feature_tokens` maps to, and `cls_id`) and `tok.n_bins`; with
    `views` and `tok.thinned_view` plus the views' token columns (`VIEW_COLUMNS`) of the same types."""
    schema = RECORD_SCHEMA
    if compact:
        n_tokens = max(int(np.max(src.feature_tokens, initial=-1)), cls_id) + 1
        schema = compact_record_schema(n_tokens, tok.n_bins)
    if views and tok.thinned_view > 0:
        for name, key in zip(VIEW_COLUMNS, TOKEN_COLUMNS * 2, strict=True):
            schema = schema.append(pa.field(name, schema.field(key).type))
    return schema


PROFILE_CELLS = 20_000
"""Cells `attach_batch_profile` reads at most, split evenly over the batches (all of a smaller batch)."""


def attach_batch_profile(
    src: ResolvedSource, cells: int = PROFILE_CELLS, seed: int = 0, depth: str = "dataset"
) -> ResolvedSource:
    """`src` with `batch_log_profile` measured on a sample of its cells: up to `cells / n_batches` cells
    of each batch (at least 20), drawn with `seed`. `depth` is `tokenizer.view_restyle_depth`: with
    `dataset` each batch's median depth is part of its profile, with `cell` the quantiles of its library
    sizes are kept too (`batch_log_depths`). One X read of the sample; the profile holds
    `n_batches x n_vars` float32 and travels with every read task."""
    n_batches = len(src.batch_categories)
    n_vars = len(src.feature_tokens)
    if n_batches < 2:
        log.warning(
            "tokenizer.view_restyle: the cells come from one %s, so the views keep its style; "
            "restyling needs cells of several batches",
            src.batch_key,
        )
    rng = np.random.default_rng(seed)
    with open_experiment(src.soma_uri, src.tiledb_config) as exp:
        obs = (
            exp.obs.read(coords=(src.joinids,), column_names=[keys.SOMA_JOINID, src.batch_key])
            .concat()
            .to_pandas()
        )
        codes = pd.Categorical(
            obs[src.batch_key].astype(str), categories=src.batch_categories
        ).codes.astype(np.int64)
        ids = obs[keys.SOMA_JOINID].to_numpy().astype(np.int64)
        per_batch = max(20, cells // max(n_batches, 1))
        picked = []
        for b in range(n_batches):
            members = ids[codes == b]
            if len(members) > per_batch:
                members = rng.choice(members, per_batch, replace=False)
            picked.append(members)
        sample = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
        X = exp.ms[src.measurement].X[src.layer]
        rows, cols, vals = _coo_arrays(list(X.read(coords=(sample,)).tables()))
    batch_of = pd.Series(codes, index=ids).reindex(sample).to_numpy()
    local = np.searchsorted(sample, rows)
    counts = sp.csr_matrix((vals.astype(np.float64), (local, cols)), shape=(len(sample), n_vars))
    profile = batch_log_profile(counts, batch_of, n_batches, depth=depth == "dataset")
    depths = None
    if depth == "cell":
        depths = batch_log_depths(np.asarray(counts.sum(axis=1)).ravel(), batch_of, n_batches)
    return dataclasses.replace(src, batch_log_profile=profile, batch_log_depths=depths)


def _coo_arrays(tables: list[pa.Table]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, values) of a SOMA X read's tables, without a copy when it is one chunk."""

    def flat(name: str, dtype) -> np.ndarray:
        chunks = [c.to_numpy() for t in tables for c in t.column(name).chunks]
        if not chunks:
            return np.zeros(0, dtype)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    return flat("soma_dim_0", np.int64), flat("soma_dim_1", np.int64), flat("soma_data", np.float32)


def _segments(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`coo_segments` of the COO `rows` over the sorted, unique cell ids `ids` (every row is one of them)."""
    ids = np.asarray(ids, np.int64)
    starts = np.flatnonzero(np.diff(ids, prepend=ids[:1] - 2) != 1)
    return coo_segments(rows, ids[starts], np.append(starts, len(ids)).astype(np.int64))


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
            schema = record_schema(src, tok, cls_id, compact=False)
            return ReadTask(read, meta, schema=schema, per_task_row_limit=per_task_row_limit)

        return [make(c) for c in chunks if len(c)]

    def get_name(self) -> str:
        return "SomaTokens"

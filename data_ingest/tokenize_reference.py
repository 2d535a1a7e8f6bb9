"""The reference tokenizer: a plain per-cell Python loop that follows the scGPT reference step by step. The
tests hold the compiled tokenizer (`tokenize.tokenize_csr`) equal to it; nothing else uses it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_ingest import keys
from data_ingest.binning import bin_nonzero
from data_ingest.tokenize import (
    RECORD_SCHEMA,
    TokenizerConfig,
    TokenizeStats,
    check_values,
    pick_keys,
    tie_uniforms,
)


def tokenize_csr_reference(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    cell_ids: np.ndarray,
    feature_tokens: np.ndarray,
    cfg: TokenizerConfig,
    cls_id: int,
    batch: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    modality: int = keys.MODALITY_RNA,
    stats: TokenizeStats | None = None,
) -> pa.Table:
    """The per-cell definition of `tokenize_csr` (same arguments, same result), one cell at a time."""
    n = len(indptr) - 1
    stats = stats if stats is not None else TokenizeStats()
    stats.cells_in += n
    data = np.asarray(data)
    check_values(data)
    feature_tokens = np.asarray(feature_tokens, np.int64)
    batch = np.zeros(n, np.int32) if batch is None else np.asarray(batch, np.int32)
    labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    n_keep = cfg.max_seq_len - 1
    cand_cols = np.flatnonzero(feature_tokens >= 0)

    genes_out: list[np.ndarray] = []
    values_out: list[np.ndarray] = []
    keep_rows: list[int] = []
    for i in range(n):
        lo, hi = indptr[i], indptr[i + 1]
        cols, vals = np.asarray(indices[lo:hi]), data[lo:hi]
        tok = feature_tokens[cols]
        ok = (vals > 0) & (tok >= 0)
        cols, vals, tok = cols[ok], vals[ok], tok[ok]
        if len(tok) < cfg.min_genes:
            stats.skipped_few_genes += 1
            continue
        cid = np.full(len(tok), cell_ids[i], np.int64)
        ties = (
            tie_uniforms(cfg.seed, cid, tok)
            if cfg.tie_break == "random"
            else np.full(len(tok), 0.5)
        )
        bins = bin_nonzero(vals.astype(np.float64), cfg.n_bins, ties)
        if len(tok) > n_keep:
            order = (
                np.lexsort((pick_keys(cfg.seed, cid, tok), -vals))
                if cfg.gene_selection == "top"
                else np.argsort(pick_keys(cfg.seed, cid, tok), kind="stable")
            )
            pick = np.sort(order[:n_keep])
            tok, bins = tok[pick], bins[pick]
            stats.truncated += 1
        elif cfg.include_zero_genes and len(tok) < n_keep:
            expressed = np.zeros(len(feature_tokens), bool)
            expressed[cols] = True
            zero_tok = feature_tokens[cand_cols[~expressed[cand_cols]]]
            take = min(n_keep - len(tok), len(zero_tok))
            zkeys = pick_keys(cfg.seed, np.full(len(zero_tok), cell_ids[i]), zero_tok)
            extra = zero_tok[np.sort(np.argsort(zkeys, kind="stable")[:take])]
            tok = np.concatenate([tok, extra])
            bins = np.concatenate([bins, np.zeros(take, np.int64)])
        genes_out.append(np.concatenate([[cls_id], tok]).astype(np.int32))
        values_out.append(np.concatenate([[keys.PAD_VALUE], bins]).astype(np.int16))
        keep_rows.append(i)

    stats.cells_out += len(keep_rows)
    rows = np.asarray(keep_rows, dtype=np.int64)
    return pa.Table.from_arrays(
        [
            _list_array(genes_out, pa.int32()),
            _list_array(values_out, pa.int16()),
            pa.array(batch[rows], pa.int32()),
            pa.array(np.full(len(rows), modality, np.int8), pa.int8()),
            pa.array(np.asarray(cell_ids, np.int64)[rows], pa.int64()),
            pa.array(labels[rows], pa.int32()),
        ],
        schema=RECORD_SCHEMA,
    )


def _list_array(rows: list[np.ndarray], typ: pa.DataType) -> pa.ListArray:
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, typ))

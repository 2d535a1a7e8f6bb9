"""Cells -> scGPT token records (DESIGN.md "Token record").

A record holds `<cls>` first, then the selected genes' vocabulary ids and their per-cell bins. Selection keeps
the cell's expressed genes (random subset when there are more than `max_seq_len - 1`) and, if
`include_zero_genes`, fills the rest of the context with randomly chosen unexpressed genes. Every random choice
comes from a generator seeded by `(seed, cell_id)`, so a cell tokenizes the same way wherever it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_ingest import keys
from data_ingest.binning import bin_nonzero

RECORD_SCHEMA = pa.schema(
    [
        pa.field(keys.GENES, pa.list_(pa.int32())),
        pa.field(keys.VALUES, pa.list_(pa.int16())),
        pa.field(keys.BATCH, pa.int32()),
        pa.field(keys.MODALITY, pa.int8()),
        pa.field(keys.CELL_ID, pa.int64()),
        pa.field(keys.LABEL, pa.int32()),
    ]
)


@dataclass
class TokenizerConfig:
    """How a cell becomes a token record."""

    n_bins: int = 51
    """Number of value bins including 0 (zero expression); non-zero values get bins 1..n_bins-1."""
    max_seq_len: int = 256
    """Tokens per cell including `<cls>`."""
    include_zero_genes: bool = False
    """Fill the context with unexpressed genes (value 0) after the expressed ones."""
    min_genes: int = 1
    """Cells with fewer expressed (in-vocabulary) genes are skipped and counted."""
    seed: int = 0
    """Seed for gene sub-sampling and tie-breaking in binning."""

    def __post_init__(self) -> None:
        if self.n_bins < 3:
            raise ValueError(
                f"tokenizer.n_bins={self.n_bins}; it needs at least 3 (0 plus two bins)"
            )
        if self.max_seq_len < 2:
            raise ValueError(
                f"tokenizer.max_seq_len={self.max_seq_len}; it needs room for <cls> and a gene"
            )


@dataclass
class TokenizeStats:
    """Counts a caller reports (e.g. to MLflow) so skipped cells are never silent."""

    cells_in: int = 0
    cells_out: int = 0
    skipped_few_genes: int = 0
    truncated: int = 0

    def merge(self, other: TokenizeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def tokenize_csr(
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
    """Tokenize cells given as CSR rows over features.

    `feature_tokens[j]` is the vocabulary id of feature column `j`, or -1 when the gene is not in the
    vocabulary (such genes are dropped). `batch` / `labels` are per-cell ints (default 0 / -1).
    """
    n = len(indptr) - 1
    stats = stats if stats is not None else TokenizeStats()
    stats.cells_in += n
    if data.size and np.nanmin(data) < 0:
        raise ValueError(
            "negative expression values in the input; pass raw counts or log-normalized (non-negative) data"
        )
    batch = np.zeros(n, np.int32) if batch is None else np.asarray(batch, np.int32)
    labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    n_keep = cfg.max_seq_len - 1
    all_tokens = np.flatnonzero(feature_tokens >= 0) if cfg.include_zero_genes else None

    genes_out: list[np.ndarray] = []
    values_out: list[np.ndarray] = []
    keep_rows: list[int] = []
    for i in range(n):
        lo, hi = indptr[i], indptr[i + 1]
        cols, vals = indices[lo:hi], data[lo:hi]
        tok = feature_tokens[cols]
        ok = (vals > 0) & (tok >= 0)
        cols, vals, tok = cols[ok], vals[ok], tok[ok]
        if len(tok) < cfg.min_genes:
            stats.skipped_few_genes += 1
            continue
        rng = np.random.default_rng([cfg.seed, int(cell_ids[i])])
        bins = bin_nonzero(vals.astype(np.float64), cfg.n_bins, rng)
        if len(tok) > n_keep:
            pick = np.sort(rng.choice(len(tok), n_keep, replace=False))
            tok, bins = tok[pick], bins[pick]
            stats.truncated += 1
        elif cfg.include_zero_genes and len(tok) < n_keep:
            expressed = np.zeros(len(feature_tokens), bool)
            expressed[cols] = True
            zero_cols = all_tokens[~expressed[all_tokens]]
            take = min(n_keep - len(tok), len(zero_cols))
            extra = feature_tokens[rng.choice(zero_cols, take, replace=False)]
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

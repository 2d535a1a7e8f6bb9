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

    Vectorized over the whole batch of cells (quantile edges, bin lookup, output assembly); only the per-cell
    seeded generator draws stay in a loop, and only for cells that need them (a value on a bin edge, or
    gene sub-sampling / zero filling). The result is identical to `tokenize_csr_reference`, the per-cell
    definition, which is used as-is when the values are not exactly representable in float32.
    """
    n = len(indptr) - 1
    if data.size and np.nanmin(data) < 0:
        raise ValueError(
            "negative expression values in the input; pass raw counts or log-normalized (non-negative) data"
        )
    indptr = np.asarray(indptr, np.int64)
    data = np.asarray(data)
    vals32 = data.astype(np.float32)
    if data.dtype != np.float32 and not np.array_equal(vals32, data, equal_nan=True):
        return tokenize_csr_reference(
            indptr,
            indices,
            data,
            cell_ids,
            feature_tokens,
            cfg,
            cls_id,
            batch,
            labels,
            modality,
            stats,
        )
    stats = stats if stats is not None else TokenizeStats()
    stats.cells_in += n
    cell_ids = np.asarray(cell_ids, np.int64)
    batch = np.zeros(n, np.int32) if batch is None else np.asarray(batch, np.int32)
    labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    n_keep = cfg.max_seq_len - 1
    nb = cfg.n_bins - 1  # number of quantile edges

    # Expressed, in-vocabulary entries, in CSR order.
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    tok_all = np.asarray(feature_tokens)[indices]
    ok = (vals32 > 0) & (tok_all >= 0)
    counts = np.bincount(row_of[ok], minlength=n)
    keep = counts >= cfg.min_genes
    stats.skipped_few_genes += int(n - keep.sum())
    ok &= keep[row_of]
    rows = np.flatnonzero(keep)
    nk = len(rows)
    local = np.cumsum(keep) - 1  # kept-cell index of each original row
    cell = local[row_of[ok]]
    cols = np.asarray(indices)[ok]
    toks = tok_all[ok]
    x = vals32[ok]
    cnt = counts[rows]
    off = np.zeros(nk + 1, np.int64)
    np.cumsum(cnt, out=off[1:])

    # Quantile edges of each cell's values, exactly as np.quantile(method="linear") computes them.
    xbits = x.view(np.uint32).astype(np.uint64)
    key = (cell.astype(np.uint64) << np.uint64(32)) | xbits
    srt = np.sort(key)
    s = (srt & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32).astype(np.float64)
    has = cnt > 0
    q = np.linspace(0.0, 1.0, nb)
    vi = (cnt[:, None] - 1) * q[None, :]  # (nk, nb)
    prev = np.floor(vi)
    above = vi >= (cnt[:, None] - 1)
    prev_i = np.where(above, -1, prev).astype(np.int64)
    gamma = vi - prev_i
    last = np.maximum(cnt - 1, 0)[:, None]
    a_idx = np.where(above, last, prev_i) + off[:-1, None]
    b_idx = np.where(above, last, prev_i + 1) + off[:-1, None]
    a_idx = np.where(has[:, None], a_idx, 0)
    b_idx = np.where(has[:, None], b_idx, 0)
    a = s[a_idx] if s.size else np.zeros(vi.shape)
    b = s[b_idx] if s.size else np.zeros(vi.shape)
    diff_ba = b - a
    edges = a + diff_ba * gamma
    hi = gamma >= 0.5
    edges[hi] = (b - diff_ba * (1 - gamma))[hi]

    # Bin lookup against float32 values: e <= x <=> up(e) <= x, and e < x <=> down(e) < x.
    e32 = edges.astype(np.float32)
    up = np.where(e32 < edges, np.nextafter(e32, np.float32(np.inf)), e32)
    down = np.where(e32 > edges, np.nextafter(e32, np.float32(-np.inf)), e32)
    prefix = (np.arange(nk, dtype=np.uint64) << np.uint64(32))[:, None]
    up_key = (prefix | up.view(np.uint32).astype(np.uint64)).ravel()
    down_key = (prefix | down.view(np.uint32).astype(np.uint64)).ravel()
    base = cell * nb
    left = np.searchsorted(up_key, key, side="right") - base  # np.digitize(x, edges)
    right = np.searchsorted(down_key, key, side="left") - base  # np.digitize(x, edges, right=True)

    # Seeded per-cell draws, only where they change the result.
    tie = right != left
    tie_cells = np.bincount(cell[tie], minlength=nk) > 0
    trunc = cnt > n_keep
    fill = cfg.include_zero_genes & (cnt < n_keep)
    need = np.flatnonzero(tie_cells | trunc | fill)
    u = np.zeros(len(x))
    sel = np.ones(len(x), bool)
    extra_tok: dict[int, np.ndarray] = {}
    all_tokens = np.flatnonzero(feature_tokens >= 0) if cfg.include_zero_genes else None
    for c in need.tolist():
        lo, hi_ = int(off[c]), int(off[c + 1])
        rng = np.random.default_rng([cfg.seed, int(cell_ids[rows[c]])])
        if hi_ > lo:
            u[lo:hi_] = rng.random(hi_ - lo)
        if trunc[c]:
            pick = np.sort(rng.choice(hi_ - lo, n_keep, replace=False))
            sel[lo:hi_] = False
            sel[lo + pick] = True
        elif fill[c]:
            expressed = np.zeros(len(feature_tokens), bool)
            expressed[cols[lo:hi_]] = True
            zero_cols = all_tokens[~expressed[all_tokens]]
            take = min(n_keep - (hi_ - lo), len(zero_cols))
            extra_tok[c] = feature_tokens[rng.choice(zero_cols, take, replace=False)]
    digits = np.ceil(u * (right - left) + left).astype(np.int64)
    bins = np.clip(digits, 1, cfg.n_bins - 1)
    stats.truncated += int(trunc.sum())

    # Assemble: <cls>, selected genes in CSR order, then zero-filled genes.
    n_sel = np.bincount(cell[sel], minlength=nk)
    n_extra = np.zeros(nk, np.int64)
    for c, t in extra_tok.items():
        n_extra[c] = len(t)
    lengths = 1 + n_sel + n_extra
    out_off = np.zeros(nk + 1, np.int64)
    np.cumsum(lengths, out=out_off[1:])
    genes_flat = np.zeros(int(out_off[-1]), np.int32)
    values_flat = np.zeros(int(out_off[-1]), np.int16)
    genes_flat[out_off[:-1]] = cls_id
    values_flat[out_off[:-1]] = keys.PAD_VALUE
    sel_cell = cell[sel]
    sel_start = np.zeros(nk + 1, np.int64)
    np.cumsum(n_sel, out=sel_start[1:])
    dest = out_off[:-1][sel_cell] + 1 + (np.arange(len(sel_cell)) - sel_start[sel_cell])
    genes_flat[dest] = toks[sel]
    values_flat[dest] = bins[sel]
    for c, t in extra_tok.items():
        lo = int(out_off[c] + 1 + n_sel[c])
        genes_flat[lo : lo + len(t)] = t  # values stay 0
    stats.cells_out += nk
    offsets = pa.array(out_off.astype(np.int32))
    return pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(offsets, pa.array(genes_flat, pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(values_flat, pa.int16())),
            pa.array(batch[rows], pa.int32()),
            pa.array(np.full(nk, modality, np.int8), pa.int8()),
            pa.array(cell_ids[rows], pa.int64()),
            pa.array(labels[rows], pa.int32()),
        ],
        schema=RECORD_SCHEMA,
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

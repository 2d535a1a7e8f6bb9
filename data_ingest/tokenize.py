"""Cells -> scGPT token records (docs/architecture.md, "The token record").

A record holds `<cls>` first, then the selected genes' vocabulary ids and their per-cell bins. Selection keeps
the cell's expressed genes in column order (when there are more than `max_seq_len - 1`, a uniformly random
subset or its most highly expressed ones, `gene_selection`) and, if `include_zero_genes`, fills the rest of the context with uniformly chosen
unexpressed genes (also in column order).

Randomness is counter-based: every random number is a hash of `(seed, cell_id, gene token, purpose)`, so a
cell tokenizes the same way wherever it is read and whatever cells it is read with (exact resume, any read
task size), and a block of cells is tokenized by compiled per-cell loops (`data_ingest.tokenize_kernel`):

- gene sub-sampling keeps the `max_seq_len - 1` genes with the smallest hash keys: a uniform random subset
  (or, selecting the top, the hash keys break ties among equal values at the cut);
- a value on a quantile edge goes between its left and right bin by a hashed uniform draw (the scGPT
  reference draws it from `np.random`).

`tokenize_reference.tokenize_csr_reference` is the per-cell definition; `tokenize_csr` returns the identical
table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_ingest import keys, tokenize_kernel

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

TOKEN_COLUMNS = (keys.GENES, keys.VALUES)
"""The record columns holding one entry per token."""
VIEW_COLUMNS = (keys.VIEW_GENES[0], keys.VIEW_VALUES[0], keys.VIEW_GENES[1], keys.VIEW_VALUES[1])
"""The two thinned views' token columns (tokenizer.thinned_view), typed as `TOKEN_COLUMNS`."""


def compact_record_schema(n_tokens: int, n_bins: int) -> pa.Schema:
    """`RECORD_SCHEMA` with the narrowest token types that hold every id below `n_tokens` (uint16 up to
    65,536) and every value of `n_bins` bins plus the special values (int8 up to 127 bins).

    Read tasks ship records this way (a binned census cell is 3 bytes per token instead of 6): the
    stream's object store and its shuffle buffer hold half as much. `widen` restores `RECORD_SCHEMA`."""
    genes = pa.uint16() if n_tokens <= 2**16 else pa.int32()
    values = pa.int8() if n_bins <= 127 else pa.int16()
    schema = RECORD_SCHEMA.set(0, pa.field(keys.GENES, pa.list_(genes)))
    return schema.set(1, pa.field(keys.VALUES, pa.list_(values)))


def widen(table: pa.Table) -> pa.Table:
    """`table` (records in a `compact_record_schema`) with `RECORD_SCHEMA`'s token types."""
    for name, like in zip(TOKEN_COLUMNS + VIEW_COLUMNS, TOKEN_COLUMNS * 3, strict=True):
        i, wide = table.schema.get_field_index(name), RECORD_SCHEMA.field(like).with_name(name)
        if i >= 0 and table.schema.field(i).type != wide.type:
            table = table.set_column(i, wide, table.column(i).cast(wide.type))
    return table


SALT_TIE = 1
"""Hash purpose: tie-break uniform of a value on a bin edge."""
SALT_PICK = 2
"""Hash purpose: sub-sampling key of a gene (smallest keys are kept)."""
PICK_KEY_BITS = 40
"""Bits of a sub-sampling key. Two genes of a cell share a key with probability about 1e-6 per truncated
cell; the earlier column then wins, in both implementations."""

_U64_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


TIE_BREAKS = ("random", "mid")
RESTYLE_DEPTHS = ("dataset", "cell", "off")
GENE_SELECTIONS = ("random", "top")


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
    tie_break: str = "mid"
    """A value on one or more quantile edges (in count data, most 1s and 2s): `random` puts it uniformly
    between its left and right bin (the scGPT reference), `mid` in the middle bin, so equal counts of a
    cell get equal bins (the default: random ties add noise the model cannot predict, docs/learning.md)."""

    thinned_view: float = 0.0
    """With p > 0 each record also carries two more records of the same cell (`VIEW_COLUMNS`), each from
    its counts thinned independently (`thin_csr`: every count kept with probability p) and tokenised
    afresh (its own bins and top genes), for the thinned-view contrast (objectives.cce_view: thinned): the
    views share the cell's type, state and batch, and only part of its counting noise."""
    view_max_seq_len: int = 0
    """Tokens per thinned view, `<cls>` included (0: `max_seq_len`). A view keeps its cell's most expressed
    genes (with `gene_selection: top`), so shorter views cost less attention and still show the type
    (docs/learning.md measures it)."""
    view_restyle: bool = False
    """Thin each view's gene `g` with keep probability `thinned_view x m[t, g] / m[b, g]` (at most 1),
    where `b` is the cell's batch, `t` a batch drawn at random for each view, and `m` each batch's mean
    normalised expression (`batch_log_profile`): the two views of a cell come in the gene-wise styles of
    two random batches, so the contrast cannot match them by their batch and learns an embedding that
    does not carry it (docs/learning.md, section 4)."""
    view_restyle_depth: str = "dataset"
    """With `view_restyle`, what a restyled view takes of the target batch's sequencing depth: `dataset`
    (the default) batch `t`'s median library size (the view keeps its cell's depth relative to its own
    batch's median); `cell` the library size of a random cell of batch `t` (a quantile drawn from the
    view's stream), so the two views of a cell share no depth at all; `off` none (per-10,000-count
    profiles: the view keeps its cell's depth). A deeper target keeps more counts, at most all. Depth the
    views share is what the contrast matches them by, and the embedding then carries the dataset through
    it; on Splat `dataset` learns the type sooner and leaves less dataset in the embedding than `cell`
    (docs/learning.md, section 4)."""
    gene_selection: str = "top"
    """Which expressed genes a cell with more than `max_seq_len - 1` keeps: `random` (a uniform subset, as
    the scGPT reference) or `top` (its most highly expressed, as Geneformer's rank encoding; equal values
    at the cut are chosen at random; the default: the kept genes then say which cell type it is, docs/learning.md).
    Bins are always computed over all of the cell's expressed genes."""

    def __post_init__(self) -> None:
        if self.gene_selection not in GENE_SELECTIONS:
            raise ValueError(
                f"tokenizer.gene_selection={self.gene_selection!r}; choose one of {GENE_SELECTIONS}"
            )
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"tokenizer.tie_break={self.tie_break!r}; choose one of {TIE_BREAKS}")
        if not 0.0 <= self.thinned_view < 1.0:
            raise ValueError(
                f"tokenizer.thinned_view={self.thinned_view}; it is a keep probability in (0, 1), "
                "or 0 for no view"
            )
        if self.view_max_seq_len and not 2 <= self.view_max_seq_len <= self.max_seq_len:
            raise ValueError(
                f"tokenizer.view_max_seq_len={self.view_max_seq_len}; it needs room for <cls> and a "
                f"gene and at most max_seq_len={self.max_seq_len} (0 means max_seq_len)"
            )
        if self.view_restyle_depth not in RESTYLE_DEPTHS:
            raise ValueError(
                f"tokenizer.view_restyle_depth={self.view_restyle_depth!r}; choose one of "
                f"{RESTYLE_DEPTHS}"
            )
        if self.view_restyle and not self.thinned_view:
            raise ValueError(
                "tokenizer.view_restyle restyles the thinned views; set tokenizer.thinned_view "
                "(a keep probability, e.g. 0.5) or turn view_restyle off"
            )
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


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective, well-mixed map of uint64 arrays."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def cell_streams(seed: int, cell_ids: np.ndarray, salt: int) -> np.ndarray:
    """One uint64 key per cell for `(seed, salt)`; distinct cell ids get distinct keys."""
    head = (int(seed) * 0x9E3779B97F4A7C15 + int(salt) * 0xD1B54A32D192ED03) & _U64_MASK
    head = mix64(np.array([head], dtype=np.uint64))[0]
    return mix64(np.asarray(cell_ids, dtype=np.int64).astype(np.uint64) ^ head)


def gene_hashes(streams: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """uint64 hash of each (cell stream, gene token) pair; the arrays broadcast."""
    return mix64(streams ^ (np.asarray(tokens, dtype=np.int64).astype(np.uint64) * _GOLDEN))


def tie_uniforms(seed: int, cell_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Tie-break uniform in [0, 1) of gene `tokens[i]` in cell `cell_ids[i]`."""
    return _uniforms(gene_hashes(cell_streams(seed, cell_ids, SALT_TIE), tokens))


def pick_keys(seed: int, cell_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Sub-sampling key of gene `tokens[i]` in cell `cell_ids[i]` (`PICK_KEY_BITS` bits)."""
    return _pick_keys(gene_hashes(cell_streams(seed, cell_ids, SALT_PICK), tokens))


def _uniforms(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _pick_keys(h: np.ndarray) -> np.ndarray:
    return h >> np.uint64(64 - PICK_KEY_BITS)


def check_values(data: np.ndarray) -> None:
    """Refuse negative expression values (the tokenizer bins counts or log-normalized data)."""
    if data.size and np.nanmin(data) < 0:
        raise ValueError(
            "negative expression values in the input; pass raw counts or log-normalized (non-negative) data"
        )


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

    Compiled per-cell loops (`data_ingest.tokenize_kernel`); the result is identical to
    `tokenize_csr_reference`.
    """
    data = np.asarray(data)
    check_values(data)
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    indptr = np.asarray(indptr, np.int64)
    indices = np.asarray(indices)
    if indices.dtype not in (np.int32, np.int64):
        indices = indices.astype(np.int64)
    stats = stats if stats is not None else TokenizeStats()
    n = len(indptr) - 1
    cell_ids = np.asarray(cell_ids, np.int64)
    batch = np.zeros(n, np.int32) if batch is None else np.asarray(batch, np.int32)
    labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    feature_tokens = np.asarray(feature_tokens, np.int64)
    step = max(1, (2**31 - 1) // cfg.max_seq_len)  # list offsets stay within int32
    parts = []
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        a, b = indptr[lo], indptr[hi]
        parts.append(
            _tokenize_block(
                indptr[lo : hi + 1] - a,
                indices[a:b],
                data[a:b],
                cell_ids[lo:hi],
                feature_tokens,
                cfg,
                cls_id,
                batch[lo:hi],
                labels[lo:hi],
                modality,
                stats,
            )
        )
    if len(parts) == 1:
        return parts[0]
    return pa.concat_tables(parts) if parts else RECORD_SCHEMA.empty_table()


def _kernel_args(cfg: TokenizerConfig, cls_id: int, cell_ids: np.ndarray) -> tuple:
    """The tokenizer kernels' arguments after the data: hash streams, quantiles and settings."""
    return (
        cell_streams(cfg.seed, cell_ids, SALT_PICK),
        cell_streams(cfg.seed, cell_ids, SALT_TIE),
        cfg.tie_break == "mid",
        cfg.gene_selection == "top",
        np.linspace(0.0, 1.0, cfg.n_bins - 1),
        cfg.max_seq_len - 1,
        cfg.min_genes,
        cfg.include_zero_genes,
        cls_id,
        keys.PAD_VALUE,
        64 - PICK_KEY_BITS,
    )


def _count(stats: TokenizeStats, n: int, n_out: int, truncated: int) -> None:
    stats.cells_in += n
    stats.cells_out += n_out
    stats.skipped_few_genes += n - n_out
    stats.truncated += int(truncated)


def tokenize_segments_into(
    seg_ptr: np.ndarray,
    seg_lo: np.ndarray,
    seg_hi: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    cell_ids: np.ndarray,
    feature_tokens: np.ndarray,
    cfg: TokenizerConfig,
    cls_id: int,
    stats: TokenizeStats,
    starts: np.ndarray,
    genes: np.ndarray,
    values: np.ndarray,
    lengths: np.ndarray,
) -> None:
    """Tokenize cells whose entries lie in segments of (indices, data) — cell `i`'s are
    `[seg_lo[s], seg_hi[s])` for `s` in `seg_ptr[i] .. seg_ptr[i + 1] - 1` (a CSR row is one segment;
    `data_ingest.tokenize_kernel.coo_segments` indexes a SOMA read) — writing cell `i`'s record to `genes` /
    `values` from `starts[i]` (room for `cfg.max_seq_len` entries) and its length to `lengths[i]` (0:
    skipped)."""
    truncated = tokenize_kernel.tokenize_into(
        seg_ptr,
        seg_lo,
        seg_hi,
        indices,
        data,
        feature_tokens,
        *_kernel_args(cfg, cls_id, cell_ids),
        starts,
        genes,
        values,
        lengths,
    )
    _count(stats, len(lengths), int(np.count_nonzero(lengths)), truncated)


def record_table(
    offsets: np.ndarray,
    genes: np.ndarray,
    values: np.ndarray,
    cell_ids: np.ndarray,
    batch: np.ndarray,
    labels: np.ndarray,
    modality: int = keys.MODALITY_RNA,
    schema: pa.Schema = RECORD_SCHEMA,
) -> pa.Table:
    """A `schema` table (`RECORD_SCHEMA` or a `compact_record_schema`) of records given as list offsets
    (any int type) over flat genes / values, with per-record cell ids, batch and label ids (no copy of the
    token arrays where offsets fit int32 and their types match the schema)."""
    gene_type, value_type = (schema.field(k).type.value_type for k in TOKEN_COLUMNS)
    n = len(offsets) - 1
    step = max(1, (2**31 - 1) // max(1, int(np.diff(offsets).max(initial=1))))
    batches = []
    for lo in range(0, n, step) if n else [0]:
        hi = min(lo + step, n)
        a, b = int(offsets[lo]), int(offsets[hi])
        off = pa.array((offsets[lo : hi + 1] - a).astype(np.int32))
        batches.append(
            pa.RecordBatch.from_arrays(
                [
                    pa.ListArray.from_arrays(off, pa.array(genes[a:b], gene_type)),
                    pa.ListArray.from_arrays(off, pa.array(values[a:b], value_type)),
                    pa.array(batch[lo:hi], pa.int32()),
                    pa.array(np.full(hi - lo, modality, np.int8), pa.int8()),
                    pa.array(cell_ids[lo:hi], pa.int64()),
                    pa.array(labels[lo:hi], pa.int32()),
                ],
                schema=schema,
            )
        )
    return pa.Table.from_batches(batches, schema=schema)


def _tokenize_block(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    cell_ids: np.ndarray,
    feature_tokens: np.ndarray,
    cfg: TokenizerConfig,
    cls_id: int,
    batch: np.ndarray,
    labels: np.ndarray,
    modality: int,
    stats: TokenizeStats,
) -> pa.Table:
    n = len(indptr) - 1
    keep, offsets, genes, values, truncated = tokenize_kernel.tokenize_block(
        np.arange(n + 1, dtype=np.int64),
        indptr[:-1],
        indptr[1:],
        indices,
        data,
        feature_tokens,
        *_kernel_args(cfg, cls_id, cell_ids),
    )
    _count(stats, n, int(keep.sum()), truncated)
    return record_table(offsets, genes, values, cell_ids[keep], batch[keep], labels[keep], modality)

"""Cells -> scGPT token records (DESIGN.md "Token record").

A record holds `<cls>` first, then the selected genes' vocabulary ids and their per-cell bins. Selection keeps
the cell's expressed genes in column order (a uniformly random subset when there are more than
`max_seq_len - 1`) and, if `include_zero_genes`, fills the rest of the context with uniformly chosen
unexpressed genes (also in column order).

Randomness is counter-based: every random number is a hash of `(seed, cell_id, gene token, purpose)`, so a
cell tokenizes the same way wherever it is read and whatever cells it is read with (exact resume, any read
task size), and a whole block of cells is tokenized with array operations, without a per-cell Python loop:

- gene sub-sampling keeps the `max_seq_len - 1` genes with the smallest hash keys: a uniform random subset;
- a value on a quantile edge goes between its left and right bin by a hashed uniform draw (the scGPT
  reference draws it from `np.random`).

`tokenize_csr_reference` is the per-cell definition; `tokenize_csr` returns the identical table.
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

SALT_TIE = 1
"""Hash purpose: tie-break uniform of a value on a bin edge."""
SALT_PICK = 2
"""Hash purpose: sub-sampling key of a gene (smallest keys are kept)."""
PICK_KEY_BITS = 40
"""Bits of a sub-sampling key. Two genes of a cell share a key with probability about 1e-6 per truncated
cell; the earlier column then wins, in both implementations."""
MAX_CELLS_PER_BLOCK = 1 << 20
"""Cells tokenized in one vectorized pass (the cell index shares a 64-bit sort key with a pick key)."""

_U64_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NEVER = np.uint64(_U64_MASK)  # larger than any pick key: marks a gene that must not be picked
_ZERO_FILL_ENTRIES = 1 << 22  # (cells x genes) hash matrix entries per zero-fill pass (32 MB)
_COUNT_TABLE_ENTRIES = 1 << 22  # (cells x values) lookup table entries of the integer binning path
_PICK_BUCKET_BITS = 8  # sub-sampling histogram buckets per cell: 2**8


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


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective, well-mixed map of uint64 arrays."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def cell_streams(seed: int, cell_ids: np.ndarray, salt: int) -> np.ndarray:
    """One uint64 key per cell for `(seed, salt)`; distinct cell ids get distinct keys."""
    head = (int(seed) * 0x9E3779B97F4A7C15 + int(salt) * 0xD1B54A32D192ED03) & _U64_MASK
    head = _mix64(np.array([head], dtype=np.uint64))[0]
    return _mix64(np.asarray(cell_ids, dtype=np.int64).astype(np.uint64) ^ head)


def gene_hashes(streams: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """uint64 hash of each (cell stream, gene token) pair; the arrays broadcast."""
    return _mix64(streams ^ (np.asarray(tokens, dtype=np.int64).astype(np.uint64) * _GOLDEN))


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


def _check_values(data: np.ndarray) -> None:
    if data.size and np.nanmin(data) < 0:
        raise ValueError(
            "negative expression values in the input; pass raw counts or log-normalized (non-negative) data"
        )


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of `arange(s, s + n)` for each (start, length) pair."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = _offsets(lengths)[:-1]
    return np.arange(total, dtype=np.int64) + np.repeat(starts - first, lengths)


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

    Vectorized over all cells (one sort for the quantiles, one for sub-sampling); the result is identical to
    `tokenize_csr_reference`, which is used as-is when the values are not exactly representable in float32.
    """
    data = np.asarray(data)
    _check_values(data)
    indptr = np.asarray(indptr, np.int64)
    vals32 = data.astype(np.float32, copy=False)
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
    n = len(indptr) - 1
    cell_ids = np.asarray(cell_ids, np.int64)
    batch = np.zeros(n, np.int32) if batch is None else np.asarray(batch, np.int32)
    labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    indices = np.asarray(indices, np.int64)
    feature_tokens = np.asarray(feature_tokens, np.int64)
    # Blocks keep the cell index within its share of a sort key and the list offsets within int32.
    step = max(1, min(MAX_CELLS_PER_BLOCK, (2**31 - 1) // cfg.max_seq_len))
    parts = []
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        a, b = indptr[lo], indptr[hi]
        parts.append(
            _tokenize_block(
                indptr[lo : hi + 1] - a,
                indices[a:b],
                vals32[a:b],
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


def _tokenize_block(
    indptr: np.ndarray,
    indices: np.ndarray,
    x_all: np.ndarray,
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
    stats.cells_in += n

    # Expressed, in-vocabulary entries of the cells kept, in CSR order (so grouped by cell).
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    tok_all = feature_tokens[indices]
    ok = (x_all > 0) & (tok_all >= 0)
    counts = np.bincount(row_of[ok], minlength=n)
    keep = counts >= cfg.min_genes
    stats.skipped_few_genes += int(n - keep.sum())
    ok &= keep[row_of]
    rows = np.flatnonzero(keep)
    nk = len(rows)
    cell = (np.cumsum(keep) - 1)[row_of[ok]]  # kept-cell index of each entry, non-decreasing
    cols, toks, x = indices[ok], tok_all[ok], x_all[ok]
    cnt = counts[rows]
    off = _offsets(cnt)
    ids = cell_ids[rows]

    sel, trunc = _subsample(cell, toks, cnt, off, ids, cfg)
    sel_idx = np.flatnonzero(sel)
    bins = _bin_block(cell, x, toks, cnt, off, ids, cfg, sel_idx)  # of the selected entries
    stats.truncated += int(trunc.sum())
    if cfg.include_zero_genes:
        extra_cell, extra_tok = _zero_fill(cell, cols, cnt, off, ids, feature_tokens, cfg)
    else:
        extra_cell = extra_tok = np.zeros(0, np.int64)

    # Assemble: <cls>, the selected expressed genes in CSR order, then the zero-filled genes.
    n_sel = np.bincount(cell[sel], minlength=nk)
    n_extra = np.bincount(extra_cell, minlength=nk)
    out_off = _offsets(1 + n_sel + n_extra)
    genes_flat = np.zeros(int(out_off[-1]), np.int32)
    values_flat = np.zeros(int(out_off[-1]), np.int16)
    genes_flat[out_off[:-1]] = cls_id
    values_flat[out_off[:-1]] = keys.PAD_VALUE
    sel_cell = cell[sel_idx]
    dest = out_off[sel_cell] + 1 + np.arange(len(sel_cell)) - _offsets(n_sel)[sel_cell]
    genes_flat[dest] = toks[sel_idx]
    values_flat[dest] = bins
    dest = out_off[extra_cell] + 1 + n_sel[extra_cell]
    dest += np.arange(len(extra_cell)) - _offsets(n_extra)[extra_cell]
    genes_flat[dest] = extra_tok  # values stay 0
    stats.cells_out += nk
    offsets = pa.array(out_off.astype(np.int32))
    return pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(offsets, pa.array(genes_flat, pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(values_flat, pa.int16())),
            pa.array(batch[rows], pa.int32()),
            pa.array(np.full(nk, modality, np.int8), pa.int8()),
            pa.array(ids, pa.int64()),
            pa.array(labels[rows], pa.int32()),
        ],
        schema=RECORD_SCHEMA,
    )


def _bin_block(
    cell: np.ndarray,
    x: np.ndarray,
    toks: np.ndarray,
    cnt: np.ndarray,
    off: np.ndarray,
    ids: np.ndarray,
    cfg: TokenizerConfig,
    which: np.ndarray,
) -> np.ndarray:
    """`bin_nonzero` of the entries `which`, each cell binned by all its values `x` (float32, > 0, grouped
    by `cell`), for all cells in one pass."""
    nk, m, nb = len(cnt), len(x), cfg.n_bins - 1  # nb: quantile edges per cell
    counts = _as_small_counts(x, nk)
    if counts is not None:
        # Integer values below v_max: a (cell, value) histogram replaces the sort.
        xi, v_max = counts
        flat = cell * v_max + xi
        cum = np.cumsum(np.bincount(flat, minlength=nk * v_max))

        def value_at(rank: np.ndarray) -> np.ndarray:  # value of the entry of global sorted rank
            return (np.searchsorted(cum, rank, "right") % v_max).astype(np.float64)
    else:
        key = (cell.astype(np.uint64) << np.uint64(32)) | x.view(np.uint32).astype(np.uint64)
        perm = np.argsort(key, kind="stable")  # by (cell, value): float32 bits order like values
        skey = key[perm]
        s = x[perm].astype(np.float64)

        def value_at(rank: np.ndarray) -> np.ndarray:
            return s[rank]

    # Quantile edges of each cell's values, exactly as np.quantile(method="linear") computes them.
    has = cnt > 0
    q = np.linspace(0.0, 1.0, nb)
    vi = (cnt[:, None] - 1) * q[None, :]  # (nk, nb)
    above = vi >= (cnt[:, None] - 1)
    prev_i = np.where(above, -1, np.floor(vi)).astype(np.int64)
    gamma = vi - prev_i
    last = np.maximum(cnt - 1, 0)[:, None]
    a_idx = np.where(has[:, None], np.where(above, last, prev_i) + off[:-1, None], 0)
    b_idx = np.where(has[:, None], np.where(above, last, prev_i + 1) + off[:-1, None], 0)
    a = value_at(a_idx) if m else np.zeros(vi.shape)
    b = value_at(b_idx) if m else np.zeros(vi.shape)
    diff_ba = b - a
    edges = a + diff_ba * gamma
    hi = gamma >= 0.5
    edges[hi] = (b - diff_ba * (1 - gamma))[hi]

    if counts is not None:
        # For an integer v: e <= v <=> ceil(e) <= v, and e < v <=> floor(e) + 1 <= v. Count edges per
        # (cell, value) and accumulate along values: a lookup table of np.digitize for every integer.
        row = np.arange(nk)[:, None] * v_max
        n_le = np.bincount((row + np.ceil(edges)).astype(np.int64).ravel(), minlength=nk * v_max)
        n_lt = np.bincount(
            (row + np.floor(edges) + 1).astype(np.int64).ravel(), minlength=nk * v_max
        )
        n_le = n_le.reshape(nk, v_max).cumsum(axis=1).ravel()
        n_lt = n_lt.reshape(nk, v_max).cumsum(axis=1).ravel()
        left, right = n_le[flat[which]], n_lt[flat[which]]
    else:
        # Where each edge falls in its cell's sorted values: e <= x <=> up(e) <= x and e < x <=>
        # down(e) < x for float32 x, with up / down the float32 neighbours of the float64 edge e.
        e32 = edges.astype(np.float32)
        up = np.where(e32 < edges, np.nextafter(e32, np.float32(np.inf)), e32)
        down = np.where(e32 > edges, np.nextafter(e32, np.float32(-np.inf)), e32)
        prefix = (np.arange(nk, dtype=np.uint64) << np.uint64(32))[:, None]
        up_key = (prefix | up.view(np.uint32).astype(np.uint64)).ravel()
        down_key = (prefix | down.view(np.uint32).astype(np.uint64)).ravel()
        first_ge = np.searchsorted(skey, up_key, "left")
        first_gt = np.searchsorted(skey, down_key, "right")
        # Sorted entry i has left = #edges of its cell <= x_i: all edges of earlier cells sit at or
        # before the cell's first entry, those of later cells after its last; count all, subtract.
        base = cell * nb
        left = np.empty(m, np.int64)
        right = np.empty(m, np.int64)
        left[perm] = np.cumsum(np.bincount(first_ge, minlength=m + 1))[:m] - base
        right[perm] = np.cumsum(np.bincount(first_gt, minlength=m + 1))[:m] - base
        left, right = left[which], right[which]

    u = np.zeros(len(which))
    tie = np.flatnonzero(right != left)
    streams = cell_streams(cfg.seed, ids, SALT_TIE)
    u[tie] = _uniforms(gene_hashes(streams[cell[which[tie]]], toks[which[tie]]))
    digits = np.ceil(u * (right - left) + left).astype(np.int64)
    return np.clip(digits, 1, nb)


def _as_small_counts(x: np.ndarray, n_cells: int) -> tuple[np.ndarray, int] | None:
    """(x as integers, bound) when every value is an integer and a (cell, value) table stays small."""
    if not x.size:
        return None
    v_max = int(x.max()) + 2  # values 0 .. max, and floor(edge) + 1 <= max + 1
    if n_cells * v_max > _COUNT_TABLE_ENTRIES:
        return None
    xi = x.astype(np.int64)
    if not np.array_equal(xi, x):
        return None
    return xi, v_max


def _subsample(
    cell: np.ndarray,
    toks: np.ndarray,
    cnt: np.ndarray,
    off: np.ndarray,
    ids: np.ndarray,
    cfg: TokenizerConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(entry kept, cell truncated): cells with more than `max_seq_len - 1` genes keep the genes with the
    smallest pick keys (ties: the earlier entry)."""
    n_keep = cfg.max_seq_len - 1
    trunc = cnt > n_keep
    sel = np.ones(len(cell), bool)
    nt = int(trunc.sum())
    if not nt:
        return sel, trunc
    idx = _ranges(off[:-1][trunc], cnt[trunc])  # entries of truncated cells, grouped by cell
    t = (np.cumsum(trunc) - 1)[cell[idx]]  # truncated-cell index of each entry
    key = _pick_keys(gene_hashes(cell_streams(cfg.seed, ids, SALT_PICK)[cell[idx]], toks[idx]))
    # Coarse pass: a histogram of each cell's keys over buckets finds the bucket holding its
    # n_keep-th smallest key; only that bucket's entries need sorting.
    bucket = (key >> np.uint64(PICK_KEY_BITS - _PICK_BUCKET_BITS)).astype(np.int64)
    n_buckets = 1 << _PICK_BUCKET_BITS
    hist = np.bincount(t * n_buckets + bucket, minlength=nt * n_buckets).reshape(nt, n_buckets)
    cum = hist.cumsum(axis=1)
    edge = np.argmax(cum >= n_keep, axis=1)  # the boundary bucket of each truncated cell
    below = cum[np.arange(nt), edge] - hist[np.arange(nt), edge]
    e_edge = edge[t]
    drop = bucket > e_edge
    tied = np.flatnonzero(bucket == e_edge)  # grouped by cell, in entry order
    tc = t[tied]
    order = np.argsort(
        (tc.astype(np.uint64) << np.uint64(PICK_KEY_BITS)) | key[tied], kind="stable"
    )
    start = _offsets(np.bincount(tc, minlength=nt))[:-1]
    rank = np.empty(len(tied), np.int64)
    rank[order] = np.arange(len(tied)) - start[tc[order]]
    drop[tied] = rank >= (n_keep - below)[tc]
    sel[idx[drop]] = False
    return sel, trunc


def _zero_fill(
    cell: np.ndarray,
    cols: np.ndarray,
    cnt: np.ndarray,
    off: np.ndarray,
    ids: np.ndarray,
    feature_tokens: np.ndarray,
    cfg: TokenizerConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(cell, token) of the unexpressed genes that fill each cell's context: those with the smallest pick
    keys, sorted by cell, then column."""
    cand_cols = np.flatnonzero(feature_tokens >= 0)
    cand_tok = feature_tokens[cand_cols]
    g = len(cand_cols)
    col_pos = np.full(len(feature_tokens), -1, np.int64)
    col_pos[cand_cols] = np.arange(g)
    want = np.minimum(cfg.max_seq_len - 1 - cnt, g - cnt)
    fill = np.flatnonzero(want > 0)
    streams = cell_streams(cfg.seed, ids, SALT_PICK)
    tok_mix = cand_tok.astype(np.uint64) * _GOLDEN
    shift = np.uint64(64 - PICK_KEY_BITS)
    out_cell, out_tok = [], []
    step = max(1, _ZERO_FILL_ENTRIES // max(g, 1))
    for lo in range(0, len(fill), step):
        cc = fill[lo : lo + step]
        k = want[cc]
        keys_ = _mix64(streams[cc][:, None] ^ tok_mix[None, :]) >> shift  # (C, G) pick keys
        ent = _ranges(off[:-1][cc], cnt[cc])
        keys_[np.repeat(np.arange(len(cc)), cnt[cc]), col_pos[cols[ent]]] = _NEVER
        kmax = int(k.max())
        smallest = np.partition(keys_, kmax - 1, axis=1)[:, :kmax]
        smallest.sort(axis=1)
        chosen = keys_ <= smallest[np.arange(len(cc)), k - 1][:, None]
        for r in np.flatnonzero(chosen.sum(1) != k):  # a key tie at the threshold (rare)
            chosen[r] = False
            chosen[r, np.argsort(keys_[r], kind="stable")[: k[r]]] = True
        r, j = np.nonzero(chosen)
        out_cell.append(cc[r])
        out_tok.append(cand_tok[j])
    if not out_cell:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_cell), np.concatenate(out_tok)


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
    _check_values(data)
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
        bins = bin_nonzero(vals.astype(np.float64), cfg.n_bins, tie_uniforms(cfg.seed, cid, tok))
        if len(tok) > n_keep:
            smallest = np.argsort(pick_keys(cfg.seed, cid, tok), kind="stable")[:n_keep]
            pick = np.sort(smallest)
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

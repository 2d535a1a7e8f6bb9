"""Thinned views of a cell for the thinned-view contrast (`tokenizer.thinned_view`, `objectives.cce_view:
thinned`): each view is the cell's counts thinned binomially, optionally towards a random dataset's
gene-wise profile and depth (`view_restyle`), then tokenised afresh; `attach_views` puts them beside the
record as `VIEW_COLUMNS`. Deterministic per (seed, cell, epoch position, view)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from data_ingest import keys, tokenize_kernel
from data_ingest.tokenize import (
    _GOLDEN,
    TOKEN_COLUMNS,
    TokenizerConfig,
    cell_streams,
    mix64,
)

SALT_THIN = 3
"""Hash purpose: thinned views (tokenizer.thinned_view); view v uses SALT_THIN + v."""


def thin_streams(seed: int, cell_ids: np.ndarray, epoch_keys: np.ndarray, view: int) -> np.ndarray:
    """One uint64 stream per cell for thinned view `view`, from the cell id and a per-cell key (in the
    stream: the cell's position in the epoch, so another view each epoch and the same one on a resume)."""
    keys_ = mix64(np.asarray(epoch_keys, dtype=np.int64).astype(np.uint64) + _GOLDEN)
    return mix64(cell_streams(seed, cell_ids, SALT_THIN + view) ^ keys_)


SALT_RESTYLE = 0x5E57
"""Hash purpose: the batch whose style a restyled view takes (`restyled_keep`), from the view's stream."""
RESTYLE_PSEUDO = 0.01
"""Added to each batch's mean normalised expression (per 10,000 counts) before the log: a gene a batch
never shows is restyled towards (almost) absent, not by an infinite factor."""
RESTYLE_MAX_LOG = 3.0
"""Largest |log ratio| of two batches' profiles a restyled view applies (a factor of 20 either way)."""
SALT_RESTYLE_DEPTH = 0x5E58
"""Hash purpose: which quantile of the target batch's library sizes a view takes (`view_restyle_depth:
cell`), from the view's stream."""
DEPTH_QUANTILES = 33
"""Quantiles of each batch's log library size kept for `view_restyle_depth: cell` (0%, 3.125%, ... 100%)."""


def batch_log_profile(
    X: sp.csr_matrix, batch: np.ndarray, n_batches: int, depth: bool = False
) -> np.ndarray:
    """`(n_batches, n_genes)` float32: log of each batch's mean expression per 10,000 counts (+
    `RESTYLE_PSEUDO`) over the cells of `X` (counts, one row per cell, `batch[i]` its batch code). A batch
    with no cell in `X` gets the mean over all cells. With `depth` each batch's row is also shifted by
    the log of its median library size over 10,000 (the overall median for a batch without cells), so
    two rows' difference is the ratio of the batches' expected counts at their typical depths."""
    X = sp.csr_matrix(X, dtype=np.float64)
    lib = np.asarray(X.sum(axis=1)).ravel()
    norm = sp.diags(np.where(lib > 0, 1e4 / np.maximum(lib, 1e-12), 0.0)) @ X
    batch = np.asarray(batch, np.int64)
    onehot = sp.csr_matrix(
        (np.ones(len(batch)), (batch, np.arange(len(batch)))), shape=(n_batches, len(batch))
    )
    counts = np.asarray(onehot.sum(axis=1)).ravel()
    sums = np.asarray((onehot @ norm).todense())
    overall = np.asarray(norm.mean(axis=0)).ravel() if len(batch) else np.zeros(X.shape[1])
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], overall[None, :])
    profile = np.log(means + RESTYLE_PSEUDO)
    if depth:
        median_all = np.median(lib[lib > 0]) if (lib > 0).any() else 1e4
        medians = np.full(n_batches, median_all)
        for b in np.unique(batch):
            cells = lib[(batch == b) & (lib > 0)]
            if len(cells):
                medians[b] = np.median(cells)
        profile += np.log(medians / 1e4)[:, None]
    return profile.astype(np.float32)


def batch_log_depths(lib: np.ndarray, batch: np.ndarray, n_batches: int) -> np.ndarray:
    """`(n_batches, DEPTH_QUANTILES)` float32: evenly spaced quantiles of the log library size `lib` of
    each batch's cells (cells with no count left out; the overall ones for a batch without cells)."""
    lib = np.asarray(lib, np.float64)
    batch = np.asarray(batch, np.int64)
    q = np.linspace(0.0, 1.0, DEPTH_QUANTILES)
    some = lib > 0
    overall = np.quantile(np.log(lib[some]), q) if some.any() else np.full(len(q), np.log(1e4))
    out = np.tile(overall, (n_batches, 1))
    for b in np.unique(batch[some]):
        out[b] = np.quantile(np.log(lib[some & (batch == b)]), q)
    return out.astype(np.float32)


def restyled_keep(
    p: float,
    log_profile: np.ndarray,
    batch: np.ndarray,
    streams: np.ndarray,
    entry_cell: np.ndarray,
    cols: np.ndarray,
    depth: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Keep probability of each entry of a restyled thinned view (`TokenizerConfig.view_restyle`): cell
    `i` (batch `batch[i]`, view stream `streams[i]`) takes the style of batch `t_i`, drawn from its stream,
    so entry `e` (cell `entry_cell[e]`, gene column `cols[e]`) is kept with probability
    `p x exp(log_profile[t, g] - log_profile[b, g])`, the log ratio clipped to `RESTYLE_MAX_LOG` and the
    probability to 1. With `depth = (log_depths, cell_log_lib)` (`view_restyle_depth: cell`; per-10,000
    profiles) the view also takes the depth of a random cell of batch `t`: the log ratio gains
    `log_depths[t, u_i] - cell_log_lib[i]`, `u_i` a quantile drawn from the cell's stream."""
    n_batches = log_profile.shape[0]
    streams = np.asarray(streams, np.uint64)
    target_cell = (mix64(streams ^ np.uint64(SALT_RESTYLE)) % np.uint64(n_batches)).astype(np.int64)
    target = target_cell[entry_cell]
    own = np.asarray(batch, np.int64)[entry_cell]
    cols = np.asarray(cols, np.int64)
    ratio = log_profile[target, cols].astype(np.float64) - log_profile[own, cols]
    if depth is not None:
        log_depths, cell_log_lib = depth
        u = (
            mix64(streams ^ np.uint64(SALT_RESTYLE_DEPTH)) % np.uint64(log_depths.shape[1])
        ).astype(np.int64)
        shift = log_depths[target_cell, u].astype(np.float64) - np.asarray(cell_log_lib, np.float64)
        ratio = ratio + shift[entry_cell]
    ratio = np.clip(ratio, -RESTYLE_MAX_LOG, RESTYLE_MAX_LOG)
    return np.minimum(1.0, p * np.exp(ratio))


def thin_csr(
    X: sp.csr_matrix,
    p: float,
    seed: int,
    cell_ids: np.ndarray,
    epoch_keys: np.ndarray,
    view: int,
    restyle: tuple[np.ndarray, np.ndarray] | None = None,
    log_depths: np.ndarray | None = None,
) -> sp.csr_matrix:
    """`X` (cells `cell_ids`) with every count kept with probability `p` (`tokenize_kernel.thin_segments`;
    the same draws as the stream's read tasks make for the same cell, key and view). With `restyle =
    (log_profile, batch)` each cell is restyled as `restyled_keep` says; with `log_depths` also to a random
    cell's depth of the target batch (the library sizes are the rows of `X`)."""
    n = X.shape[0]
    out = np.empty(len(X.data), np.float32)
    streams = thin_streams(seed, cell_ids, epoch_keys, view)
    indices = X.indices.astype(np.int64)
    if restyle is None:
        keep = np.full(len(X.data), float(p))
    else:
        entry_cell = np.repeat(np.arange(n), np.diff(X.indptr))
        depth = None
        if log_depths is not None:
            lib = np.asarray(X.sum(axis=1), np.float64).ravel()
            depth = (log_depths, np.log(np.maximum(lib, 1.0)))
        keep = restyled_keep(p, restyle[0], restyle[1], streams, entry_cell, indices, depth)
    tokenize_kernel.thin_segments(
        np.arange(n + 1, dtype=np.int64),
        X.indptr[:-1].astype(np.int64),
        X.indptr[1:].astype(np.int64),
        indices,
        X.data.astype(np.float64),
        streams,
        keep,
        out,
    )
    return sp.csr_matrix((out, X.indices, X.indptr), shape=X.shape)


def view_tokenizer(tok: TokenizerConfig) -> TokenizerConfig:
    """The tokenizer of the thinned views: `tok` with `view_max_seq_len` tokens per cell when it is set."""
    if not tok.view_max_seq_len or tok.view_max_seq_len == tok.max_seq_len:
        return tok
    return dataclasses.replace(tok, max_seq_len=tok.view_max_seq_len)


def attach_views(records: pa.Table, views: list[pa.Table]) -> pa.Table:
    """`records` with each of `views`' token columns as `VIEW_COLUMNS`, matched by cell id; a cell a view
    lost (too few genes left after thinning) gets its own record there."""
    ids = records.column(keys.CELL_ID).to_numpy()
    tokens = records.select(list(TOKEN_COLUMNS))
    for i, view in enumerate(views):
        vids = view.column(keys.CELL_ID).to_numpy()
        order = np.argsort(vids, kind="stable")
        at, found = np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        if len(vids):
            at = order[np.searchsorted(vids, ids, sorter=order).clip(0, len(vids) - 1)]
            found = vids[at] == ids
        both = pa.concat_tables([view.select(list(TOKEN_COLUMNS)).cast(tokens.schema), tokens])
        picked = both.take(pa.array(np.where(found, at, len(vids) + np.arange(len(ids)))))
        for name, key in ((keys.VIEW_GENES[i], keys.GENES), (keys.VIEW_VALUES[i], keys.VALUES)):
            field = pa.field(name, tokens.schema.field(key).type)
            records = records.append_column(field, picked[key])
    return records

"""Per-rank streams of token batches with a scatter-gather shuffle and exact mid-epoch resume.

The census stores cells grouped by dataset, so reading contiguous rows gives batches from one dataset
(cellxgene-census issue 538). Each epoch is planned on every rank, identically, from `(seed, epoch)`:

1. **Scatter.** The selected cells (sorted soma_joinids) are cut into chunks of `chunk_size` consecutive cells,
   starting at an offset drawn per epoch, and the chunks are permuted globally.
2. **Split.** The concatenated order is cut into `world_size` equal, contiguous slices; rank `r` takes slice
   `r` and uses its first `batches_per_rank * batch_size` cells (the rest of the epoch's cells wait for the next
   epoch, whose order differs). Every rank does the same number of batches.
3. **Gather.** A rank's slice is read `buffer_size` cells at a time (one Ray Data read task per buffer, reading
   `buffer_size / chunk_size` chunks from different places), and the cells of one buffer are permuted by a
   generator seeded by `(seed, epoch, rank, buffer)`.

Batch `k` of a rank is the cells at positions `k*B .. (k+1)*B - 1` of that rank's order, minus the cells the
tokenizer skips (fewer than `min_genes` expressed genes). Because positions are fixed before anything is read,
resuming at batch `k` reads only from the buffer holding position `k*B` onwards and yields exactly the batches
an uninterrupted iteration yields after its first `k`.

Read tasks tokenize (binning, gene selection); the training worker only concatenates and slices Arrow tables.
At most `prefetch` read tasks run ahead of the consumer. With `token_cache.dir` set, read tasks take token
records from a Parquet cache (`data_ingest.cache`), building its shards on first use: same batches, and
later epochs skip X reads and tokenization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_ingest.cache import CacheEntry, TokenCacheConfig
from data_ingest.datasource import read_token_table
from data_ingest.source import ResolvedSource
from data_ingest.tokenize import RECORD_SCHEMA, TokenizerConfig

POS_COLUMN = "_pos"
"""Position of a cell in its rank's epoch order; carried from read tasks to the batcher, then dropped."""

_STREAM_SALT = 0x5C6E7  # separates the stream's generators from other users of the same seed


@dataclass
class StreamConfig:
    """How a rank's epoch is cut, shuffled and prefetched."""

    chunk_size: int = 64
    """Consecutive cells (by soma_joinid) moved together by the global shuffle. Smaller mixes datasets better;
    larger reads faster: X is stored in tiles of a few hundred rows, so on the synthetic census a 64-cell
    chunk decodes ~5x the data it uses and a 256-cell chunk ~2x. At census scale use 256 with an 8192-cell
    buffer (what `python -m jobs.bench data` measures)."""
    buffer_size: int = 2048
    """Cells read by one read task and shuffled together; a multiple of `chunk_size` mixes best (about 32
    chunks per buffer mix as well as a uniform shuffle on the synthetic census). X is read 2048 cells at a
    time, so memory is about prefetch x buffer_size token records."""
    prefetch: int = 2
    """Read tasks running ahead of the consumer (bounds memory: about prefetch x buffer_size records)."""
    read_task_cpus: float = 0.5
    """Logical CPUs reserved by each read task."""
    token_cache: TokenCacheConfig = field(default_factory=TokenCacheConfig)
    """Parquet cache of token records for repeated epochs (off unless `token_cache.dir` is set)."""

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.buffer_size < 1 or self.prefetch < 1:
            raise ValueError(
                f"stream chunk_size={self.chunk_size}, buffer_size={self.buffer_size}, "
                f"prefetch={self.prefetch}: all must be >= 1"
            )


@dataclass
class StreamStats:
    """What a rank's stream yielded; log it (e.g. to MLflow) so skipped cells are never silent."""

    batches: int = 0
    cells_planned: int = 0
    """Cells of the yielded batches before tokenization."""
    cells_out: int = 0
    """Records yielded."""
    skipped_cells: int = 0
    """Cells dropped by the tokenizer (fewer than `min_genes` expressed in-vocabulary genes, or empty)."""

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        return {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def batches_per_rank(n_cells: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields in an epoch over `n_cells` selected cells."""
    return (n_cells // world_size) // batch_size


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([_STREAM_SALT, int(seed), *map(int, parts)])


def epoch_order(joinids: np.ndarray, *, seed: int, epoch: int, chunk_size: int) -> np.ndarray:
    """The epoch's global order of cells: chunks of consecutive cells, globally permuted."""
    n = len(joinids)
    rng = _rng(seed, epoch)
    offset = int(rng.integers(0, min(chunk_size, n))) if n else 0
    bounds = np.concatenate([[0], np.arange(offset or chunk_size, n, chunk_size), [n]])
    bounds = np.unique(bounds)
    perm = rng.permutation(len(bounds) - 1)
    return np.concatenate([joinids[bounds[c] : bounds[c + 1]] for c in perm])


def rank_order(
    joinids: np.ndarray,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    cfg: StreamConfig,
) -> np.ndarray:
    """soma_joinids of rank `rank`'s epoch, in the order its batches take them (before skipping)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    n_batches = batches_per_rank(len(joinids), world_size, batch_size)
    if n_batches == 0:
        raise ValueError(
            f"the selection has {len(joinids)} cells, fewer than world_size x batch_size = "
            f"{world_size} x {batch_size}; select more cells or use a smaller batch"
        )
    order = epoch_order(joinids, seed=seed, epoch=epoch, chunk_size=cfg.chunk_size)
    per_rank = len(joinids) // world_size
    mine = order[rank * per_rank : rank * per_rank + n_batches * batch_size]
    out = np.empty_like(mine)
    for b, lo in enumerate(range(0, len(mine), cfg.buffer_size)):
        part = mine[lo : lo + cfg.buffer_size]
        out[lo : lo + len(part)] = part[
            _rng(seed, epoch, rank, world_size, b).permutation(len(part))
        ]
    return out


def _read_positions(
    src: ResolvedSource,
    ids: np.ndarray,
    positions: np.ndarray,
    tok: TokenizerConfig,
    cls_id: int,
    cache: CacheEntry | None = None,
) -> pa.Table:
    """Token records for the cells `ids` (at `positions` of the rank order), in position order, with
    `POS_COLUMN`."""
    sorted_ids = np.sort(ids)
    if cache is not None:
        table = cache.read(src, sorted_ids, tok, cls_id)
    else:
        table = read_token_table(src, sorted_ids, tok, cls_id)
    got = table.column("cell_id").to_numpy()
    # Map each yielded record back to its position; a cell id appears once in an epoch.
    where = np.searchsorted(sorted_ids, got)
    pos_of_sorted = positions[np.argsort(ids, kind="stable")]
    pos = pos_of_sorted[where]
    take = np.argsort(pos, kind="stable")
    return table.take(pa.array(take)).append_column(POS_COLUMN, pa.array(pos[take], pa.int64()))


def rank_dataset(
    resolved: ResolvedSource,
    tok: TokenizerConfig,
    cls_id: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    start_batch: int = 0,
    cfg: StreamConfig | None = None,
):
    """The Ray Dataset behind `rank_batches` (ordered; records carry `POS_COLUMN`)."""
    import ray.data
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    cfg = cfg or StreamConfig()
    order = rank_order(
        resolved.joinids,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        cfg=cfg,
    )
    n_batches = len(order) // batch_size
    if not 0 <= start_batch <= n_batches:
        raise ValueError(
            f"start_batch={start_batch} is outside this epoch's {n_batches} batches per rank; the "
            "checkpoint's data position does not match this data selection (same filter, seed, "
            "world size and batch size?)"
        )
    first = start_batch * batch_size
    src = dataclasses.replace(resolved, joinids=np.zeros(0, dtype=np.int64))
    cache = None
    if cfg.token_cache.dir is not None:
        cache = CacheEntry.open(resolved, tok, cls_id, cfg.token_cache)
    schema = RECORD_SCHEMA.append(pa.field(POS_COLUMN, pa.int64()))
    tasks: list[tuple[int, int]] = []
    for lo in range(0, len(order), cfg.buffer_size):
        hi = min(lo + cfg.buffer_size, len(order))
        if hi > first:
            tasks.append((max(lo, first), hi))

    class _RankSource(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return (len(order) - first) * tok.max_seq_len * 6

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def make(lo: int, hi: int) -> ReadTask:
                positions = np.arange(lo, hi, dtype=np.int64)
                ids = order[lo:hi].copy()

                def read() -> Iterator[pa.Table]:
                    yield _read_positions(src, ids, positions, tok, cls_id, cache)

                meta = BlockMetadata(
                    num_rows=None,
                    size_bytes=(hi - lo) * tok.max_seq_len * 6,
                    exec_stats=None,
                    input_files=None,
                )
                return ReadTask(read, meta, schema=schema, per_task_row_limit=per_task_row_limit)

            return [make(lo, hi) for lo, hi in tasks]

        def get_name(self) -> str:
            return f"SomaTokensRank{rank}"

    ds = ray.data.read_datasource(
        _RankSource(),
        concurrency=cfg.prefetch,
        ray_remote_args={"num_cpus": cfg.read_task_cpus},
        override_num_blocks=max(1, len(tasks)),
    )
    ds.context.execution_options.preserve_order = True
    return ds


def rank_batches(
    resolved: ResolvedSource,
    tok: TokenizerConfig,
    cls_id: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    start_batch: int = 0,
    cfg: StreamConfig | None = None,
    stats: StreamStats | None = None,
) -> Iterator[pa.Table]:
    """Yield rank `rank`'s token batches of epoch `epoch`, starting at batch `start_batch`.

    Contract (what the training loop may rely on):
    - Every rank yields exactly `batches_per_rank(len(resolved.joinids), world_size, batch_size) -
      start_batch` tables, each with `RECORD_SCHEMA` (DESIGN.md "Token record"); call it on every rank with
      the same `seed`, `epoch`, `world_size`, `batch_size`, `cfg` and data selection.
    - Deterministic given `(seed, epoch, rank, world_size, batch_size, cfg, selection, tokenizer)`; a
      different epoch gives a different order. Ranks' cells are disjoint and no cell appears twice in an
      epoch; about `len(joinids) mod (world_size * batch_size)` cells sit out each epoch (different ones).
    - **Exact resume**: with `start_batch=k` the iterator yields exactly the batches an uninterrupted
      iteration yields after its first `k`. Store `(epoch, batches consumed in epoch)` in the checkpoint and
      pass them back as `epoch` / `start_batch`.
    - A batch holds `batch_size` records minus the cells the tokenizer skipped among its cells (fewer than
      `tok.min_genes` expressed in-vocabulary genes); it may therefore be shorter, and in a pathological
      selection empty (`num_rows == 0`) — the caller must still count it as a step on every rank. Skips are
      counted in `stats` (pass a `StreamStats` and log `stats.as_dict()`).
    - Raises `ValueError` when the selection cannot fill one batch per rank (never a silent empty epoch).
    """
    stats = stats if stats is not None else StreamStats()
    n_batches = batches_per_rank(len(resolved.joinids), world_size, batch_size)
    if start_batch == n_batches > 0:  # resumed exactly at the end of the epoch
        return
    ds = rank_dataset(
        resolved,
        tok,
        cls_id,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        start_batch=start_batch,
        cfg=cfg,
    )
    k = start_batch
    pending: list[pa.Table] = []

    def emit(parts: list[pa.Table]) -> pa.Table:
        table = (
            pa.concat_tables(parts).drop_columns([POS_COLUMN])
            if parts
            else RECORD_SCHEMA.empty_table()
        )
        stats.batches += 1
        stats.cells_planned += batch_size
        stats.cells_out += table.num_rows
        stats.skipped_cells += batch_size - table.num_rows
        return table

    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        while block.num_rows:
            end = (k + 1) * batch_size
            n_in = int(pc.sum(pc.less(block[POS_COLUMN], end)).as_py() or 0)
            if n_in:
                pending.append(block.slice(0, n_in))
                block = block.slice(n_in)
            if block.num_rows:  # the rest belongs to later batches: batch k is complete
                yield emit(pending)
                pending = []
                k += 1
    while k < n_batches:
        yield emit(pending)
        pending = []
        k += 1

"""Per-rank streams of token batches with a scatter-gather shuffle and exact mid-epoch resume.

The census stores cells grouped by dataset, so reading contiguous rows gives batches from one dataset
(cellxgene-census issue 538). Each epoch is planned on every rank, identically, from `(seed, epoch)`:

1. **Scatter.** The selected cells (sorted soma_joinids) are cut into chunks at the multiples of
   `chunk_size` (chunk k holds the selected cells with soma_joinid in `[k * chunk_size, (k + 1) * chunk_size)`,
   so a chunk is one run of X's storage tiles), and the chunks are permuted globally.
2. **Split.** The concatenated order is cut into `world_size` equal, contiguous slices; rank `r` takes slice
   `r` and uses its first `batches_per_rank * batch_size` cells (the rest of the epoch's cells wait for the next
   epoch, whose order differs). Every rank does the same number of batches.
3. **Gather.** A rank's slice is taken `buffer_size` cells at a time (about `buffer_size / chunk_size` chunks
   from different places; the first buffer is a small `first_buffer`, so the first batch comes soon) and the
   cells of one buffer are permuted by a generator seeded by `(seed, epoch, rank, buffer)`. A buffer is read
   by several Ray Data read tasks (`task_cells` cells each, whole chunks where possible), which tokenize. Inside each batch the cells are then grouped by read task,
   so the rank's iterator builds a batch from one slice of each task's records.

Batch `k` of a rank is the cells at positions `k*B .. (k+1)*B - 1` of that rank's order, minus the cells the
tokenizer skips (fewer than `min_genes` expressed genes). Because positions are fixed before anything is read,
resuming at batch `k` reads only from the buffer holding position `k*B` onwards and yields exactly the batches
an uninterrupted iteration yields after its first `k`.

Read tasks tokenize (binning, gene selection); the training worker only gathers and slices Arrow tables, and
reads the first buffer itself while Ray Data starts its read workers (`local_first_buffer`).
At most `prefetch` read tasks run at once. With `token_cache.dir` set, read tasks take token records from a
Parquet cache (`data_ingest.cache`), building its shards on first use: same batches, and later epochs skip X
reads and tokenization.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from data_ingest import keys
from data_ingest.cache import CacheEntry, TokenCacheConfig
from data_ingest.datasource import read_token_table, record_schema
from data_ingest.source import ResolvedSource
from data_ingest.tokenize import (
    RECORD_SCHEMA,
    TOKEN_COLUMNS,
    VIEW_COLUMNS,
    TokenizerConfig,
    widen,
)

POS_COLUMN = "_pos"
"""Position of a cell in its rank's epoch order; carried from read tasks to the batcher, then dropped."""
TASK_COLUMN = "_task"
"""Index of the read task that made a record (carried to the batcher, then dropped)."""
TASK_ROWS_COLUMN = "_task_rows"
"""Records that read task made in all: the batcher knows when a task, and so a buffer, is complete even if
Ray Data splits its output into several blocks."""
_CARRIED = (POS_COLUMN, TASK_COLUMN, TASK_ROWS_COLUMN)


def _block_schema(records: pa.Schema) -> pa.Schema:
    """Schema of the stream's blocks: records (compact token types) plus the carried columns."""
    for name, typ in zip(_CARRIED, (pa.int64(), pa.int32(), pa.int32()), strict=True):
        records = records.append(pa.field(name, typ))
    return records


READ_TASK_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "16777216",
    "MALLOC_ARENA_MAX": "1",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}
"""Environment of the read-task worker processes. Each task allocates and frees a few hundred MB of arrays
(TileDB's result buffers, token arrays).

- A fixed 16 MB mmap threshold and Arrow's system pool give large arrays back on free. With glibc's adaptive
  threshold and Arrow's caching pool that memory stayed with the workers and the loader's footprint crept up
  over a long epoch (measured with 8,192-cell tasks and the earlier Arrow-take read path: peak PSS 2.7 ->
  3.4 GB from a 100k- to a 1M-cell epoch, +27%; +14% with this).
- Memory mapped afresh is faulted in page by page: kernel time was 39% of the read tasks' CPU. glibc >= 2.35
  then asks for transparent huge pages (`madvise` mode, the usual default) and takes 512x fewer faults:
  two 8,192-cell tasks side by side take 0.84 s instead of 1.0 s each. Ignored where unsupported.
- One malloc arena. TileDB allocates from its threads, so its buffers came from per-thread arenas, which
  glibc trims eagerly and does not back with huge pages: a 16,384-cell task still took ~165k page faults
  and a third of its CPU in the kernel. In the main arena they are huge-page backed and reused: 1.66 ->
  1.34 s per task, 1.8M -> 0.29M faults over 11 tasks, same peak RSS (723 MB); a 1M-cell epoch
  13.9k -> 16.9k cells/s.
"""


def _trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's `malloc_trim`; a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_STREAM_SALT = 0x5C6E7  # separates the stream's generators from other users of the same seed


@dataclass
class StreamConfig:
    """How a rank's epoch is cut, shuffled and prefetched."""

    chunk_size: int = 256
    """soma_joinid block moved together by the global shuffle (chunks start at its multiples; a divisor of
    X's 2,048-row tile extent keeps a chunk inside one row of tiles). The census stores rows grouped by
    dataset, so a chunk is (nearly always) one dataset and a batch mixes at most as many datasets as its
    buffer has chunks. Smaller chunks mix better and read slower: TileDB decodes whole data tiles (2^16
    values, a few hundred cells of one 2,048-gene column tile), so a chunk also decodes the cells around it.
    500k cells x 3,000 genes, census X schema, one thread: 41k cells/s in 2,048-cell chunks, 33k in 512,
    26k in 256, 19k in 128. See the README's loader table for the trade-off with `buffer_size`."""
    buffer_size: int = 131072
    """Cells shuffled together (after the first buffer): a batch draws from about `buffer_size / chunk_size`
    chunks. 256 / 131,072 (512 chunks) gives 96% of a uniform shuffle's distinct datasets per 64-cell batch
    on 500k cells in 80 datasets; 2,048 / 65,536 (32 chunks) gives 60%. The iterator holds one buffer of
    compact token records (about `buffer_size x max_seq_len x 3` bytes at most) and Ray Data reads about
    one buffer ahead."""
    task_cells: int = 16384
    """Cells per read task (whole chunks where possible): the unit of parallel reading and tokenizing. Each
    task costs a fixed ~0.2 s (dispatch, opening the experiment, handing its block to the object store):
    16,384 read 300k cells 10% faster than 8,192 on 2 cores, 32,768 again slower (fewer tasks to overlap
    at the start of an epoch). A task holds its records (`task_cells x max_seq_len x 6` bytes) and the
    decoded X of up to `read_threads + 1` queries of 2,048 cells."""
    prefetch: int = 1
    """Read tasks running at once. Finished blocks waiting for the batcher are capped at about
    `buffer_size + prefetch x task_cells` records' worth of object store (`rank_dataset`). One task with
    `read_threads` X readers keeps 2 cores about as busy as two single-threaded tasks (1M cells: 14.2-14.8k
    against 15.2k cells/s) with one worker process fewer (peak PSS 1.9 against 2.2 GB), and its peak grows
    less from a short epoch to a long one (+11-15% from 100k to 1M cells against +14-20%: two workers'
    transient peaks line up more often in a long epoch)."""
    read_threads: int = 2
    """X queries a read task runs at once, on threads ahead of its tokenizer (`read_token_table`)."""
    read_task_cpus: float = 0.5
    """Logical CPUs reserved by each read task (with `train.cpus_per_worker` 0.5, two workers and their two
    read tasks fit a 2-CPU Ray node; `ray.resource_check` says when they do not). TileDB's compute threads
    per X query are capped at `read_task_cpus / read_threads` (rounded up; a `sm.compute_concurrency_level`
    in the source's TileDB config wins): parallel queries with one thread each decode more cells per CPU
    second than one query with a thread per core (16,384 cells on 2 cores with the tokenizer alongside:
    1.07 s with two single-threaded queries, 1.2 s with one two-threaded query)."""
    first_buffer: int = 4096
    """Size of the epoch's first buffer (the others are `buffer_size`). A batch waits for its whole buffer
    to be read, so a small first buffer brings the first batch sooner: 0.7 s instead of 4.6 s on 500k cells
    x 3,000 genes (with `local_first_buffer`). Its batches mix fewer chunks, but they are a few dozen per
    epoch; doubling buffers up to `buffer_size` instead left a quarter of a 500k-cell epoch less mixed. A
    resume keeps the epoch's buffers. `0` or `>= buffer_size`: every buffer is `buffer_size`."""
    local_first_buffer: bool = True
    """Read the first buffer of an epoch (or of a resume) in the consuming process instead of a Ray Data read
    task, while Ray Data starts: the first batch does not wait for a read worker process to start."""
    token_cache: TokenCacheConfig = field(default_factory=TokenCacheConfig)
    """Parquet cache of token records for repeated epochs (off unless `token_cache.dir` is set)."""

    def __post_init__(self) -> None:
        sizes = (
            self.chunk_size,
            self.buffer_size,
            self.task_cells,
            self.prefetch,
            self.read_threads,
        )
        if min(sizes) < 1 or self.first_buffer < 0:
            raise ValueError(
                f"stream chunk_size={self.chunk_size}, buffer_size={self.buffer_size}, "
                f"task_cells={self.task_cells}, prefetch={self.prefetch}, "
                f"read_threads={self.read_threads}, first_buffer={self.first_buffer}: all must be "
                ">= 1 (first_buffer >= 0)"
            )
        if self.buffer_size < 2 * self.chunk_size:
            raise ValueError(
                f"stream buffer_size={self.buffer_size} holds less than two chunks of chunk_size="
                f"{self.chunk_size}, so batches would not mix chunks (or datasets); use a buffer of many "
                "chunks (e.g. 32) or a smaller chunk_size (e.g. 64 for a small experiment)"
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


def buffer_starts(n: int, cfg: StreamConfig) -> np.ndarray:
    """Start positions of a rank's buffers over its `n` positions, then `n`: the first buffer holds
    `cfg.first_buffer` cells, every other one `cfg.buffer_size` (the last one what is left)."""
    first = cfg.first_buffer if 0 < cfg.first_buffer < cfg.buffer_size else cfg.buffer_size
    inner = np.arange(first, n, cfg.buffer_size, dtype=np.int64)
    return np.concatenate([[0], inner, [n]]).astype(np.int64) if n else np.zeros(1, np.int64)


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([_STREAM_SALT, int(seed), *map(int, parts)])


def epoch_order(joinids: np.ndarray, *, seed: int, epoch: int, chunk_size: int) -> np.ndarray:
    """The epoch's global order of cells: the soma_joinid-aligned chunks, globally permuted."""
    if not len(joinids):
        return np.asarray(joinids, np.int64)
    block = np.asarray(joinids, np.int64) // chunk_size
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(block)) + 1, [len(joinids)]])
    perm = _rng(seed, epoch).permutation(len(bounds) - 1)
    # Gather without a Python loop over chunks (a census epoch of 64-cell chunks has ~1M of them).
    lens = np.diff(bounds)[perm]
    out_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    take = np.arange(len(joinids)) + np.repeat(bounds[:-1][perm] - out_starts, lens)
    return np.asarray(joinids, np.int64)[take]


def check_plan(joinids: np.ndarray, *, batch_size: int, cfg: StreamConfig) -> None:
    """Raise a `ValueError` naming the knob when `cfg` cannot shuffle this selection as documented."""
    n = len(joinids)
    if n == 0:
        raise ValueError(
            "the data selection has no cells: check data.obs_filter / value_filter and the holdout split "
            "(every cell may be held out)"
        )
    if cfg.buffer_size < batch_size:
        raise ValueError(
            f"stream buffer_size={cfg.buffer_size} is smaller than one batch ({batch_size} cells): a "
            "batch would span buffers and mix only their edges; use buffer_size >= 32 x batch_size"
        )
    first, last = int(joinids[0]) // cfg.chunk_size, int(joinids[-1]) // cfg.chunk_size
    if n > 1 and first == last:
        raise ValueError(
            f"stream chunk_size={cfg.chunk_size} is larger than the selection (its {n} cells lie in one "
            "chunk of soma_joinids), so every epoch would give each rank the same cells; use a "
            f"chunk_size well below {n} (e.g. {max(1, n // 64)})"
        )


def _rank_plan(
    joinids: np.ndarray,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    cfg: StreamConfig,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(cells, position, read tasks): rank `rank`'s cells in chunk order, each one's position in its batch
    order, and the read tasks as [lo, hi) ranges of `cells`.

    Within a buffer the cells are permuted uniformly; then, inside each batch, the cells are grouped by read
    task (in task order, keeping their shuffled order within a task). A batch holds the same cells as with
    the plain permutation, and the iterator can assemble it from one contiguous slice of each task's block.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    check_plan(joinids, batch_size=batch_size, cfg=cfg)
    n_batches = batches_per_rank(len(joinids), world_size, batch_size)
    if n_batches == 0:
        raise ValueError(
            f"the selection has {len(joinids)} cells, fewer than world_size x batch_size = "
            f"{world_size} x {batch_size}; select more cells or use a smaller batch"
        )
    order = epoch_order(joinids, seed=seed, epoch=epoch, chunk_size=cfg.chunk_size)
    per_rank = len(joinids) // world_size
    mine = order[rank * per_rank : rank * per_rank + n_batches * batch_size]
    shuffled = np.empty(len(mine), np.int64)
    starts = buffer_starts(len(mine), cfg)
    for b, (lo, hi) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        shuffled[lo + _rng(seed, epoch, rank, world_size, b).permutation(hi - lo)] = np.arange(
            lo, hi
        )
    tasks = _read_tasks(mine, cfg)
    task_of = np.repeat(np.arange(len(tasks)), [hi - lo for lo, hi in tasks])
    pos = np.empty(len(mine), np.int64)
    pos[np.lexsort((shuffled, task_of, shuffled // batch_size))] = np.arange(len(mine))
    return mine, pos, tasks


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
    mine, pos, _ = _rank_plan(
        joinids,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        cfg=cfg,
    )
    out = np.empty_like(mine)
    out[pos] = mine
    return out


def read_task_tiledb_config(resolved: ResolvedSource, cfg: StreamConfig) -> dict[str, str]:
    """The TileDB config of a read task's X queries: `read_task_cpus / read_threads` compute threads each
    (rounded up), unless the source's own config sets `sm.compute_concurrency_level`."""
    threads = max(1, math.ceil(cfg.read_task_cpus / cfg.read_threads))
    return {"sm.compute_concurrency_level": str(threads), **(resolved.tiledb_config or {})}


def _take_rows(table: pa.Table, rows: np.ndarray, threads: int) -> pa.Table:
    """`table.take(rows)`, one contiguous copy first (a take from the cache's per-shard chunks is ~2x
    slower) and the rows split over `threads` (Arrow's take lets go of the GIL)."""
    table = table.combine_chunks()
    if threads <= 1 or len(rows) < 2 * threads:
        return table.take(pa.array(rows))
    with ThreadPoolExecutor(threads, thread_name_prefix="take") as pool:
        parts = pool.map(lambda r: table.take(pa.array(r)), np.array_split(rows, threads))
        return pa.concat_tables(list(parts))


def _read_positions(
    src: ResolvedSource,
    ids: np.ndarray,
    positions: np.ndarray,
    tok: TokenizerConfig,
    cls_id: int,
    cache: CacheEntry | None = None,
    readers: int = 1,
) -> pa.Table:
    """Token records of the cells `ids` (at `positions` of the rank order), in position order, with
    `POS_COLUMN`; the token columns have `record_schema(src, tok, cls_id)`'s compact types. X is read on
    `readers` threads."""
    order = np.argsort(ids, kind="stable")
    sorted_ids, sorted_pos = ids[order], positions[order]
    if cache is not None:
        table = cache.read(src, sorted_ids, tok, cls_id, readers)
        got = table.column(keys.CELL_ID).to_numpy()
        # Map each yielded record back to its position; a cell id appears once in an epoch.
        pos = sorted_pos[np.searchsorted(sorted_ids, got)]
        take = np.argsort(pos, kind="stable")
        table, pos = _take_rows(table, take, readers), pos[take]
        table = table.cast(record_schema(src, tok, cls_id))
    else:  # the records come out in position order
        table = read_token_table(
            src,
            sorted_ids,
            tok,
            cls_id,
            order_key=sorted_pos,
            compact=True,
            readers=readers,
            views=True,
        )
        pos = sorted_pos[np.searchsorted(sorted_ids, table.column(keys.CELL_ID).to_numpy())]
    return table.append_column(POS_COLUMN, pa.array(pos, pa.int64()))


def _read_tasks(cells: np.ndarray, cfg: StreamConfig) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the rank's chunk-ordered `cells`, one per read task: whole chunks, merged up to
    `task_cells` cells (a larger chunk is split); a task never spans two buffers."""
    block = cells // cfg.chunk_size
    chunk_starts = np.flatnonzero(np.diff(block)) + 1
    tasks = []
    starts = buffer_starts(len(cells), cfg).tolist()
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        inner = chunk_starts[(chunk_starts > lo) & (chunk_starts < hi)].tolist()
        pieces = [
            (s, min(s + cfg.task_cells, z))
            for a, z in zip([lo, *inner], [*inner, hi], strict=True)
            for s in range(a, z, cfg.task_cells)
        ]
        a, z = pieces[0]
        for p, q in pieces[1:]:
            if q - a <= cfg.task_cells:
                z = q
            else:
                tasks.append((a, z))
                a, z = p, q
        tasks.append((a, z))
    return tasks


@dataclass
class _RankTasks:
    """A rank's read tasks from `start_batch` on: each one's cells and their positions, in task order."""

    src: ResolvedSource
    """The source without its joinids (each task carries its own) and with the read tasks' TileDB config."""
    tok: TokenizerConfig
    cls_id: int
    cfg: StreamConfig
    tasks: list[tuple[np.ndarray, np.ndarray]]
    last_task: dict[int, int]
    """Buffer -> the index of its last read task (buffers come in task order)."""
    starts: np.ndarray
    """`buffer_starts` of the rank's epoch."""
    cache: CacheEntry | None

    @property
    def in_memory(self) -> int:
        """Bytes of the records the tasks make, at most."""
        return sum(len(ids) for ids, _ in self.tasks) * self.tok.max_seq_len * self.token_bytes

    @property
    def first_buffer_tasks(self) -> int:
        """Read tasks of the first buffer still to read."""
        return self.last_task[min(self.last_task)] + 1 if self.last_task else 0

    @property
    def block_schema(self) -> pa.Schema:
        return _block_schema(record_schema(self.src, self.tok, self.cls_id, views=True))

    @property
    def token_bytes(self) -> int:
        schema = self.block_schema
        return sum(
            schema.field(k).type.value_type.bit_width // 8
            for k in TOKEN_COLUMNS + VIEW_COLUMNS
            if k in schema.names
        )

    def read(self, t: int) -> pa.Table:
        """Task `t`'s records in position order, tagged with `TASK_COLUMN` / `TASK_ROWS_COLUMN`."""
        ids, positions = self.tasks[t]
        table = _read_positions(
            self.src, ids, positions, self.tok, self.cls_id, self.cache, self.cfg.read_threads
        )
        n = table.num_rows
        table = table.append_column(TASK_COLUMN, pa.array(np.full(n, t, np.int32)))
        return table.append_column(TASK_ROWS_COLUMN, pa.array(np.full(n, n, np.int32)))


def _rank_tasks(
    resolved: ResolvedSource,
    tok: TokenizerConfig,
    cls_id: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    start_batch: int,
    cfg: StreamConfig,
) -> _RankTasks:
    cells, pos, all_tasks = _rank_plan(
        resolved.joinids,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        cfg=cfg,
    )
    n_batches = len(cells) // batch_size
    if not 0 <= start_batch <= n_batches:
        raise ValueError(
            f"start_batch={start_batch} is outside this epoch's {n_batches} batches per rank; the "
            "checkpoint's data position does not match this data selection (same filter, seed, "
            "world size and batch size?)"
        )
    first = start_batch * batch_size
    src = dataclasses.replace(
        resolved,
        joinids=np.zeros(0, dtype=np.int64),
        tiledb_config=read_task_tiledb_config(resolved, cfg),
    )
    cache = None
    if cfg.token_cache.dir is not None:
        if tok.thinned_view > 0:
            raise ValueError(
                "data.stream.token_cache.dir is set, but the cache holds token records and "
                "tokenizer.thinned_view needs each cell's counts every epoch: unset one of them"
            )
        cache = CacheEntry.open(resolved, tok, cls_id, cfg.token_cache)
    tasks = []
    last_task: dict[int, int] = {}
    starts = buffer_starts(len(cells), cfg)
    for lo, hi in all_tasks:
        keep = pos[lo:hi] >= first  # resuming: cells before `first` were consumed
        if keep.any():
            last_task[int(np.searchsorted(starts, pos[lo], "right")) - 1] = len(tasks)
            tasks.append((cells[lo:hi][keep].copy(), pos[lo:hi][keep].copy()))
    plan = _RankTasks(src, tok, cls_id, cfg, tasks, last_task, starts, cache)
    # The plan's arrays (several int64 per cell of the rank) are garbage now; only `tasks` is kept. Give
    # the freed heap back: without this a 1M-cell rank kept ~30 MB more than a 100k-cell one.
    del cells, pos, all_tasks
    _trim_heap()
    return plan


def _tasks_dataset(plan: _RankTasks, rank: int, skip: int = 0):
    """The Ray Dataset of `plan`'s read tasks from task `skip` on (one block per task unless Ray Data
    splits it, in task order)."""
    import ray.data
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    cfg, tok = plan.cfg, plan.tok
    block_schema, token_bytes = plan.block_schema, plan.token_bytes
    todo = range(skip, len(plan.tasks))

    class _RankSource(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return plan.in_memory

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def make(t: int) -> ReadTask:
                def read() -> Iterator[pa.Table]:
                    yield plan.read(t)

                meta = BlockMetadata(
                    num_rows=None,
                    size_bytes=len(plan.tasks[t][0]) * tok.max_seq_len * token_bytes,
                    exec_stats=None,
                    input_files=None,
                )
                return ReadTask(
                    read, meta, schema=block_schema, per_task_row_limit=per_task_row_limit
                )

            return [make(t) for t in todo]

        def get_name(self) -> str:
            return f"SomaTokensRank{rank}"

    ds = ray.data.read_datasource(
        _RankSource(),
        concurrency=cfg.prefetch,
        num_cpus=cfg.read_task_cpus,
        runtime_env={"env_vars": READ_TASK_ENV},
        override_num_blocks=max(1, len(todo)),
    )
    ds.context.execution_options.preserve_order = True
    # Read ahead by about one buffer: finished blocks wait in the object store until the batcher takes them,
    # and with a trainer slower than the readers Ray Data's default budget (a share of the whole object
    # store) let ~15 blocks pile up. The blocks the batcher holds are no longer Ray Data's, so this bounds
    # only what waits; Ray Data still runs one task when the budget is spent.
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(
        object_store_memory=(cfg.buffer_size + cfg.prefetch * cfg.task_cells)
        * tok.max_seq_len
        * token_bytes
    )
    return ds


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
    """(the Ray Dataset of every read task of `rank_batches`, the index of each buffer's last read task).

    The dataset has one block per read task (unless Ray Data splits it), in task order, its records sorted
    by `POS_COLUMN` and tagged with `TASK_COLUMN` / `TASK_ROWS_COLUMN`; a batch's records are one contiguous
    range of each block (see `_rank_plan`). Token columns have compact types (`record_schema`): half the
    bytes in the object store and the batcher's buffer; `rank_batches` widens each batch."""
    plan = _rank_tasks(
        resolved,
        tok,
        cls_id,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        start_batch=start_batch,
        cfg=cfg or StreamConfig(),
    )
    return _tasks_dataset(plan, rank), plan.last_task


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
      start_batch` tables, each with `RECORD_SCHEMA` (docs/architecture.md, "The token record"); call it
      on every rank with the same `seed`, `epoch`, `world_size`, `batch_size`, `cfg` and data selection.
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
    cfg = cfg or StreamConfig()
    plan = _rank_tasks(
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
    last_task, starts = plan.last_task, plan.starts
    n_local = plan.first_buffer_tasks if cfg.local_first_buffer else 0
    k = start_batch
    held: list[pa.Table] = []  # records of positions >= k * batch_size not yet yielded

    def emit(table: pa.Table) -> pa.Table:
        stats.batches += 1
        stats.cells_planned += batch_size
        stats.cells_out += table.num_rows
        stats.skipped_cells += batch_size - table.num_rows
        return table

    def flush(limit: int) -> Iterator[pa.Table]:
        """Yield the batches that end at or before position `limit` (all records before it are held)."""
        nonlocal k, held
        sorted_pos = [block.column(POS_COLUMN).to_numpy() for block in held]
        while (k + 1) * batch_size <= limit:
            lo, hi = k * batch_size, (k + 1) * batch_size
            parts = []
            for block, pos in zip(held, sorted_pos, strict=True):
                a, b = np.searchsorted(pos, [lo, hi])
                if b > a:
                    parts.append(block.slice(a, b - a))
            # Within a batch, positions are grouped by read task, so block order is position order.
            if parts:
                table = widen(pa.concat_tables(parts).drop_columns(list(_CARRIED)).combine_chunks())
            else:
                table = RECORD_SCHEMA.empty_table()
            yield emit(table)
            k += 1
        rest = []
        for block, pos in zip(held, sorted_pos, strict=True):
            a = int(np.searchsorted(pos, k * batch_size))
            if a < len(pos):
                rest.append(block.slice(a))
        held = rest

    current = -1  # buffer of the blocks in `held` beyond the carried records
    got: dict[int, int] = {}  # records received per read task
    blocks = _blocks(plan, rank, n_local)
    try:
        for block in blocks:
            if not block.num_rows:
                continue
            b = int(np.searchsorted(starts, block.column(POS_COLUMN)[0].as_py(), "right")) - 1
            # Tasks run in position order: every record before buffer b has arrived.
            if b != current:
                yield from flush(int(starts[b]))
                current = b
            held.append(block)
            t = int(block.column(TASK_COLUMN)[0].as_py())
            got[t] = got.get(t, 0) + block.num_rows
            if t == last_task[b] and got[t] == block.column(TASK_ROWS_COLUMN)[0].as_py():
                # The buffer's last task is complete, so is the buffer: release its batches (and then its
                # blocks) now, not when the next buffer's first task ends.
                yield from flush(int(starts[b + 1]))
    finally:
        blocks.close()
    yield from flush(n_batches * batch_size)


def _blocks(plan: _RankTasks, rank: int, n_local: int) -> Iterator[pa.Table]:
    """Every read task's block of `plan`, in task order. The first `n_local` are read here, in this
    process, while Ray Data starts reading the rest on a thread: the first batch does not wait for a read
    worker process to start (about 2 s), and that start overlaps the local reads."""
    ray_iter = None
    if n_local < len(plan.tasks):
        # No prefetch: Ray Data would fetch blocks through a prefetcher actor (one more process mapping
        # every block) and format them in a thread pool, while the batcher already takes blocks as soon as
        # they are done (they wait in the object store, bounded by the read-ahead cap). 1M-cell epoch, one
        # node: peak PSS 2,439 / 2,452 -> 2,276 / 2,318 MB, RSS 3,995 / 4,074 -> 3,535 / 3,549 MB, same
        # cells/s. A block read on another node is pulled when the batcher reaches it.
        ds = _tasks_dataset(plan, rank, skip=n_local)
        ray_iter = iter(
            ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
        )
    first: dict = {}

    def start() -> None:
        try:
            first["block"] = next(ray_iter)
        except StopIteration:
            pass
        except BaseException as e:  # re-raised on the consuming thread
            first["error"] = e

    starter = None
    if ray_iter is not None and n_local:
        starter = threading.Thread(target=start, name=f"stream-start-rank{rank}", daemon=True)
        starter.start()
    try:
        for t in range(n_local):
            yield plan.read(t)
        if starter is not None:
            starter.join()
            if "error" in first:
                raise first["error"]
            if "block" in first:
                yield first["block"]
        if ray_iter is not None:
            yield from ray_iter
    finally:
        if starter is not None:
            starter.join()
        close = getattr(ray_iter, "close", None)
        if close is not None:
            close()  # stops the read tasks still in flight

"""How a rank's epoch is cut, shuffled, read and prefetched (`StreamConfig`), and what the stream counts
(`StreamStats`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from data_ingest.cache import TokenCacheConfig

CHUNK_ORDERS = ("stratified", "random")


@dataclass
class StreamConfig:
    """How a rank's epoch is cut, shuffled and prefetched."""

    chunk_size: int = 512
    """soma_joinid block moved together by the global shuffle (chunks start at its multiples; a divisor of
    X's 2,048-row tile extent keeps a chunk inside one row of tiles). The census stores rows grouped by
    dataset, so a chunk is (nearly always) one dataset and a batch mixes at most as many datasets as its
    buffer has chunks. Smaller chunks mix better and read slower: TileDB decodes whole data tiles (2^16
    values, a few hundred cells of one 2,048-gene column tile), so a chunk also decodes the cells around it.
    500k cells x 3,000 genes, census X schema, one read task in-process (two X threads and the tokenizer):
    24k cells/s in 256-cell chunks, 30k in 512, 35k in 1,024, 37k in 2,048. See the README's loader table
    for the trade-off with `buffer_size`."""
    buffer_size: int = 131072
    """Cells shuffled together (after the first buffer): a batch draws from about `buffer_size / chunk_size`
    chunks. With the stratified chunk order, 512 / 131,072 (256 chunks) gives 97-98% of a uniform shuffle's
    distinct datasets per 64-cell batch (500k cells in 80 datasets, 1M in 160; 95-96% with 4 ranks), 1,024 /
    131,072 90-96%, 2,048 / 65,536 about 70% (500k cells). The iterator holds one buffer of compact token records (about
    `buffer_size x max_seq_len x 3` bytes at most) and Ray Data reads about one buffer ahead."""
    chunk_order: str = "stratified"
    """How the epoch orders its chunks: `stratified` (each buffer's chunks evenly spread over the selection,
    so over the census's datasets: `plan.chunk_permutation`) or `random` (a uniform permutation of chunks,
    the order before stratification: 512 / 131,072 then gives 91-94%). Both give every rank its share of
    every epoch, once per cell."""
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
    prestart: bool = True
    """Training starts and warms the read workers (and the local first buffer's reader) before it builds
    the model, so that setup overlaps theirs (`read.prestart_readers`): a cold 500k-cell x 3,000-gene epoch
    on 2 cores read steadily only ~4.9 s in."""
    token_cache: TokenCacheConfig = field(default_factory=TokenCacheConfig)
    """Arrow cache of token records for repeated epochs (off unless `token_cache.dir` is set)."""

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
        if self.chunk_order not in CHUNK_ORDERS:
            raise ValueError(
                f"stream chunk_order={self.chunk_order!r}; use one of {', '.join(CHUNK_ORDERS)}"
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

"""Per-rank streams of token batches with a scatter-gather shuffle and exact mid-epoch resume.

The census stores cells grouped by dataset, so reading contiguous rows gives batches from one dataset
(cellxgene-census issue 538). Each epoch is planned on every rank, identically, from `(seed, epoch)`:

1. **Scatter.** The selected cells (sorted soma_joinids) are cut into chunks at the multiples of
   `chunk_size` (chunk k holds the selected cells with soma_joinid in `[k * chunk_size, (k + 1) * chunk_size)`,
   so a chunk is one run of X's storage tiles), and the chunks are ordered globally: by default dealt in
   rounds of one chunk from each of `buffer_size / chunk_size` evenly spread runs of the selection
   (`chunk_order: stratified`, `plan.chunk_permutation`), so each buffer holds the datasets in about their
   global proportions; or in a uniform permutation (`random`).
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
At most `prefetch` read tasks run at once. With `token_cache.dir` set, read tasks take token records from an
Arrow cache (`data_ingest.cache`), building its shards on first use: same batches, and later epochs skip X
reads and tokenization.

Modules: `config` (`StreamConfig`, `StreamStats`), `plan` (steps 1-3: the per-rank orders and read tasks),
`read` (Ray Data read tasks, the carried columns, the read workers' memory settings), `batches` (a rank's
dataset and `rank_batches`).
"""

from data_ingest.stream.batches import rank_batches, rank_dataset
from data_ingest.stream.config import StreamConfig, StreamStats
from data_ingest.stream.plan import (
    batches_per_rank,
    buffer_starts,
    check_plan,
    epoch_order,
    rank_order,
    rank_plan,
    read_tasks,
)
from data_ingest.stream.read import (
    READ_TASK_ENV,
    Prestart,
    prestart_readers,
    read_task_tiledb_config,
)

__all__ = [
    "READ_TASK_ENV",
    "Prestart",
    "StreamConfig",
    "StreamStats",
    "batches_per_rank",
    "buffer_starts",
    "check_plan",
    "epoch_order",
    "prestart_readers",
    "rank_batches",
    "rank_dataset",
    "rank_order",
    "rank_plan",
    "read_task_tiledb_config",
    "read_tasks",
]

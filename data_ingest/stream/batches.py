"""A rank's stream: its Ray Data dataset of read tasks and the batches gathered from it, resumable at any
batch (`rank_batches`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from data_ingest.source import ResolvedSource
from data_ingest.stream.config import StreamConfig, StreamStats
from data_ingest.stream.plan import batches_per_rank
from data_ingest.stream.read import (
    CARRIED_COLUMNS,
    POS_COLUMN,
    TASK_COLUMN,
    TASK_ROWS_COLUMN,
    Prestart,
    gather_blocks,
    rank_tasks,
    tasks_dataset,
)
from data_ingest.tokenize import (
    RECORD_SCHEMA,
    TokenizerConfig,
    widen,
)

GROUP_RECORDS = 2048
"""Records the iterator gathers and widens at once before cutting them into batches (a whole number of
batches, at least one): a batch is a slice of its group, which stays in memory until its last batch is
dropped (2,048 records at max_seq_len 1,200: at most ~15 MB)."""


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
    range of each block (see `rank_plan`). Token columns have compact types (`record_schema`): half the
    bytes in the object store and the batcher's buffer; `rank_batches` widens each batch."""
    plan = rank_tasks(
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
    return tasks_dataset(plan, rank), plan.last_task


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
    warm: Prestart | None = None,
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

    `warm`: read workers started beforehand (`prestart_readers`): the stream waits for them and its read
    tasks run in them.
    """
    stats = stats if stats is not None else StreamStats()
    n_batches = batches_per_rank(len(resolved.joinids), world_size, batch_size)
    if start_batch == n_batches > 0:  # resumed exactly at the end of the epoch
        return
    cfg = cfg or StreamConfig()
    plan = rank_tasks(
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
    group = max(1, GROUP_RECORDS // batch_size)  # batches gathered and widened together

    def emit(table: pa.Table) -> pa.Table:
        stats.batches += 1
        stats.cells_planned += batch_size
        stats.cells_out += table.num_rows
        stats.skipped_cells += batch_size - table.num_rows
        return table

    def flush(limit: int) -> Iterator[pa.Table]:
        """Yield the batches that end at or before position `limit` (all records before it are held)."""
        nonlocal k, held
        n_out = max(0, limit // batch_size - k)
        # Each held block's record range for every batch, in one search per block.
        bounds = (k + np.arange(n_out + 1, dtype=np.int64)) * batch_size
        cuts = [np.searchsorted(block.column(POS_COLUMN).to_numpy(), bounds) for block in held]
        for g in range(0, n_out, group):
            parts, sizes = [], []
            for j in range(g, min(g + group, n_out)):
                size = 0
                for block, cut in zip(held, cuts, strict=True):
                    a, b = int(cut[j]), int(cut[j + 1])
                    if b > a:
                        parts.append(block.slice(a, b - a))
                        size += b - a
                sizes.append(size)
            # Within a batch, positions are grouped by read task, so block order is position order.
            # A group of batches is gathered and widened at once, then cut into zero-copy slices: per
            # batch, Arrow's per-call cost (concatenate, combine, two casts) was most of the consumer's.
            whole = None
            if parts:
                whole = widen(
                    pa.concat_tables(parts).drop_columns(list(CARRIED_COLUMNS)).combine_chunks()
                )
            offset = 0
            for size in sizes:
                yield emit(whole.slice(offset, size) if size else RECORD_SCHEMA.empty_table())
                offset += size
                k += 1
        rest = []
        for block in held:
            a = int(np.searchsorted(block.column(POS_COLUMN).to_numpy(), k * batch_size))
            if a < block.num_rows:
                rest.append(block.slice(a))
        held = rest

    current = -1  # buffer of the blocks in `held` beyond the carried records
    got: dict[int, int] = {}  # records received per read task
    blocks = gather_blocks(plan, rank, n_local, warm)
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

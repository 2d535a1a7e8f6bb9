"""The epoch plan: the scatter-gather shuffle of the selected cells into equal per-rank orders, fixed from
(seed, epoch) before anything is read (steps 1-3 of the package docstring)."""

from __future__ import annotations

import numpy as np

from data_ingest.stream.config import StreamConfig

_STREAM_SALT = 0x5C6E7  # separates the stream's generators from other users of the same seed


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


def chunk_permutation(n_chunks: int, strata: int, rng: np.random.Generator) -> np.ndarray:
    """The epoch's order of `n_chunks` chunks (numbered in soma_joinid order): with `strata` > 1 a
    stratified shuffle, else a uniform permutation.

    Stratified: the chunks are cut into `strata` runs of consecutive chunks (sizes differing by at most
    one), each run is shuffled, and the order deals one chunk of every run per round, the runs in a new
    random order each round. Any `strata` consecutive chunks of the order then come from evenly spread
    parts of the selection. The census stores cells grouped by dataset, so a buffer of `strata` chunks
    holds the datasets in about their global proportions, where a uniform permutation of chunks leaves
    some datasets out of a buffer and doubles others (500k cells in 80 datasets, batches of 64, 1,024-cell
    chunks and 131,072-cell buffers: 95.8% of a uniform shuffle's distinct datasets per batch against
    86.6%)."""
    if strata <= 1 or n_chunks <= 1:
        return rng.permutation(n_chunks)
    w = min(strata, n_chunks)
    run = np.arange(n_chunks) * w // n_chunks  # non-decreasing
    first = np.searchsorted(run, np.arange(w))
    sizes = np.diff(np.append(first, n_chunks))
    shuffled = np.lexsort((rng.random(n_chunks), run))  # each run's chunks in a random order
    turn = np.empty(n_chunks, np.int64)
    # The round in which each chunk is dealt: its place in its run's random order.
    turn[shuffled] = np.arange(n_chunks) - np.repeat(first, sizes)
    return np.argsort(turn + rng.random(n_chunks), kind="stable")


def epoch_order(
    joinids: np.ndarray, *, seed: int, epoch: int, chunk_size: int, strata: int = 0
) -> np.ndarray:
    """The epoch's global order of cells: the soma_joinid-aligned chunks in `chunk_permutation` order
    (uniform unless `strata` > 1)."""
    if not len(joinids):
        return np.asarray(joinids, np.int64)
    block = np.asarray(joinids, np.int64) // chunk_size
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(block)) + 1, [len(joinids)]])
    perm = chunk_permutation(len(bounds) - 1, strata, _rng(seed, epoch))
    # Gather without a Python loop over chunks (a census epoch of 64-cell chunks has ~1M of them).
    lens = np.diff(bounds)[perm]
    out_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    take = np.arange(len(joinids)) + np.repeat(bounds[:-1][perm] - out_starts, lens)
    return np.asarray(joinids, np.int64)[take]


def order_strata(cfg: StreamConfig) -> int:
    """`chunk_permutation`'s strata for `cfg`: the chunks of one buffer (`chunk_order: stratified`), or 0."""
    return cfg.buffer_size // cfg.chunk_size if cfg.chunk_order == "stratified" else 0


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


def rank_plan(
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
    order = epoch_order(
        joinids, seed=seed, epoch=epoch, chunk_size=cfg.chunk_size, strata=order_strata(cfg)
    )
    per_rank = len(joinids) // world_size
    mine = order[rank * per_rank : rank * per_rank + n_batches * batch_size]
    shuffled = np.empty(len(mine), np.int64)
    starts = buffer_starts(len(mine), cfg)
    for b, (lo, hi) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        shuffled[lo + _rng(seed, epoch, rank, world_size, b).permutation(hi - lo)] = np.arange(
            lo, hi
        )
    tasks = read_tasks(mine, cfg)
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
    mine, pos, _ = rank_plan(
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


def read_tasks(cells: np.ndarray, cfg: StreamConfig) -> list[tuple[int, int]]:
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

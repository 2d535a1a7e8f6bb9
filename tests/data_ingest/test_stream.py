"""Per-rank streams: equal work, disjoint ranks, determinism, a new order per epoch, exact resume, skips."""

import dataclasses

import numpy as np
import pytest
from ray import cloudpickle

from data_ingest import keys
from data_ingest.source import TRAIN, SomaCellSource, SourceConfig
from data_ingest.stream import (
    READ_TASK_ENV,
    StreamConfig,
    StreamStats,
    batches_per_rank,
    buffer_starts,
    epoch_order,
    prestart_readers,
    rank_batches,
    rank_dataset,
    rank_order,
    rank_plan,
    read_task_tiledb_config,
    read_tasks,
)
from data_ingest.stream.plan import chunk_permutation
from data_ingest.stream.read import rank_tasks
from data_ingest.tokenize import RECORD_SCHEMA, TokenizerConfig
from data_ingest.vocab import GeneVocab

CFG = StreamConfig(chunk_size=16, buffer_size=128, prefetch=2, first_buffer=32)
"""A first buffer of 32 cells, then 128: the Ray tests below also cover the small first buffer."""
BATCH = 16


@pytest.fixture(scope="module")
def resolved(demo_soma):
    src = SomaCellSource(SourceConfig(soma_uri=str(demo_soma), layer="data"))
    vocab = GeneVocab.from_genes(src.gene_names())
    return src.resolve(vocab, TRAIN), vocab


def _ids(batches):
    return [b[keys.CELL_ID].to_pylist() for b in batches]


def _run(resolved, rank, epoch=0, start=0, tok=None, stats=None):
    res, vocab = resolved
    return list(
        rank_batches(
            res,
            tok or TokenizerConfig(max_seq_len=32),
            vocab.cls_id,
            seed=3,
            epoch=epoch,
            rank=rank,
            world_size=2,
            batch_size=BATCH,
            start_batch=start,
            cfg=CFG,
            stats=stats,
        )
    )


def test_rank_order_is_a_disjoint_equal_split():
    ids = np.arange(1000, 1000 + 997, dtype=np.int64)
    orders = [
        rank_order(ids, seed=1, epoch=0, rank=r, world_size=3, batch_size=10, cfg=CFG)
        for r in range(3)
    ]
    assert [len(o) for o in orders] == [batches_per_rank(997, 3, 10) * 10] * 3 == [330] * 3
    both = np.concatenate(orders)
    assert len(np.unique(both)) == len(both) and np.isin(both, ids).all()
    again = rank_order(ids, seed=1, epoch=0, rank=1, world_size=3, batch_size=10, cfg=CFG)
    assert np.array_equal(orders[1], again)
    other = rank_order(ids, seed=1, epoch=1, rank=1, world_size=3, batch_size=10, cfg=CFG)
    assert not np.array_equal(orders[1], other)
    # Scatter-gather: a batch of 10 draws from several 16-cell chunks, not one run of neighbours.
    runs = [len(np.unique(b // 16)) for b in orders[0].reshape(-1, 10)]
    assert np.mean(runs) > 4
    with pytest.raises(ValueError, match="fewer than world_size x batch_size"):
        rank_order(ids[:20], seed=1, epoch=0, rank=0, world_size=3, batch_size=10, cfg=CFG)


def test_chunks_are_joinid_aligned_and_tasks_respect_chunks_and_buffers():
    # A filtered selection: chunks are the selected cells of each 16-id block, whatever their number.
    ids = np.sort(np.random.default_rng(0).choice(np.arange(5000), 1500, replace=False))
    cfg = StreamConfig(chunk_size=16, buffer_size=200, task_cells=40)
    cells, pos, tasks = rank_plan(
        ids, seed=2, epoch=1, rank=1, world_size=2, batch_size=10, cfg=cfg
    )
    blocks = cells // 16
    runs = np.split(blocks, np.flatnonzero(np.diff(blocks)) + 1)
    assert len({int(r[0]) for r in runs}) == len(runs)  # each block appears as one run
    assert sorted(pos.tolist()) == list(range(len(cells)))
    assert tasks == read_tasks(cells, cfg)
    covered = np.concatenate([np.arange(a, b) for a, b in tasks])
    assert np.array_equal(covered, np.arange(len(cells)))
    for a, b in tasks:
        assert 0 < b - a <= cfg.task_cells
        assert a // cfg.buffer_size == (b - 1) // cfg.buffer_size  # never spans two buffers
        # A buffer's cells keep its positions.
        assert (pos[a:b] // cfg.buffer_size == a // cfg.buffer_size).all()
        # Cut only at chunk boundaries unless the buffer ends there (or a chunk is too big).
        at_buffer_end = b % cfg.buffer_size == 0 or b == len(cells)
        assert at_buffer_end or blocks[b - 1] != blocks[b]
    # Inside a batch, positions follow task order (so a batch is one slice of each task's block) ...
    task_of = np.repeat(np.arange(len(tasks)), [b - a for a, b in tasks])
    by_pos = task_of[np.argsort(pos)].reshape(-1, 10)
    assert (np.diff(by_pos, axis=1) >= 0).all()
    # ... and a batch still draws from many chunks of its buffer.
    chunk_by_pos = blocks[np.argsort(pos)].reshape(-1, 10)
    assert np.mean([len(np.unique(b)) for b in chunk_by_pos]) > 6


@pytest.mark.slow
def test_batches_straddling_buffers_resume_exactly(ray_local, resolved):
    res, vocab = resolved
    cfg = StreamConfig(chunk_size=8, buffer_size=100, task_cells=24, prefetch=2)  # 100 % 16 != 0
    kw = dict(seed=5, epoch=2, rank=0, world_size=2, batch_size=BATCH, cfg=cfg)
    tok = TokenizerConfig(max_seq_len=32, thinned_view=0.5)  # the views resume exactly too
    full = list(rank_batches(res, tok, vocab.cls_id, **kw))
    want = rank_order(res.joinids, **kw)
    assert [c for b in _ids(full) for c in b] == want.tolist()  # batch order = planned positions
    views = RECORD_SCHEMA.field(keys.GENES).type, RECORD_SCHEMA.field(keys.VALUES).type
    assert (
        full[0].schema.field(keys.VIEW_GENES[1]).type,
        full[0].schema.field(keys.VIEW_VALUES[1]).type,
    ) == views
    for k in (3, 6, 7):  # resume inside, at and right after a buffer boundary
        resumed = list(rank_batches(res, tok, vocab.cls_id, start_batch=k, **kw))
        assert len(resumed) == len(full) - k
        assert all(a.equals(b) for a, b in zip(resumed, full[k:], strict=True))


def test_two_ranks_exact_resume_and_epochs(ray_local, resolved):
    res, _ = resolved
    n_batches = batches_per_rank(len(res.joinids), 2, BATCH)
    full = {r: _run(resolved, r) for r in (0, 1)}
    for r in (0, 1):
        assert len(full[r]) == n_batches
        assert all(b.schema == RECORD_SCHEMA for b in full[r])  # read tasks ship compact types
        assert all(b.num_rows == BATCH for b in full[r])  # demo cells all have genes: no skips
    cells = [c for r in (0, 1) for b in _ids(full[r]) for c in b]
    assert len(cells) == len(set(cells)) == 2 * n_batches * BATCH  # none twice, ranks disjoint
    assert set(cells) <= set(res.joinids.tolist())
    # Batches mix datasets although rows are grouped by dataset in the experiment.
    distinct = [len(set(b[keys.BATCH].to_pylist())) for b in full[0]]
    assert np.mean(distinct) > 1.5
    # Exact resume: start at batch k on each rank == the tail of the uninterrupted iteration, record for record.
    for r, k in ((0, 5), (1, 13)):
        resumed = _run(resolved, r, start=k)
        assert len(resumed) == n_batches - k
        for a, b in zip(resumed, full[r][k:], strict=True):
            assert a.equals(b)
    # What ran before the interruption plus what ran after = the whole epoch, none twice, none skipped.
    k = 7
    seen = [c for b in _ids(full[0][:k]) + _ids(_run(resolved, 0, start=k)) for c in b]
    assert seen == [c for b in _ids(full[0]) for c in b]
    # A new order next epoch; the same order again for the same epoch.
    nxt = _run(resolved, 0, epoch=1)
    assert _ids(nxt) != _ids(full[0])
    assert _run(resolved, 0, start=n_batches) == []
    with pytest.raises(ValueError, match="start_batch"):
        _run(resolved, 0, start=n_batches + 1)


def test_skipped_cells_are_counted_and_batches_stay_aligned(ray_local, resolved):
    res, _ = resolved
    tok = TokenizerConfig(max_seq_len=32, min_genes=400)  # drops the sparser cells
    stats = StreamStats()
    out = _run(resolved, 1, tok=tok, stats=stats)
    n_batches = batches_per_rank(len(res.joinids), 2, BATCH)
    assert len(out) == stats.batches == n_batches  # same number of steps as the other rank
    assert 0 < stats.skipped_cells < stats.cells_planned
    assert (
        stats.cells_out == sum(b.num_rows for b in out) == stats.cells_planned - stats.skipped_cells
    )
    # The kept cells are exactly the unfiltered stream's cells minus the skipped ones, in the same batches.
    plain = _run(resolved, 1)
    for kept, every in zip(_ids(out), _ids(plain), strict=True):
        assert set(kept) <= set(every)
    assert stats.as_dict()["data/skipped_cells"] == stats.skipped_cells
    resumed = _run(resolved, 1, tok=tok, start=9)
    assert all(a.equals(b) for a, b in zip(resumed, out[9:], strict=True))


def test_read_ahead_is_capped_at_a_buffer_and_the_tasks_in_flight(ray_local, resolved):
    res, vocab = resolved
    tok = TokenizerConfig(max_seq_len=32)
    ds, _ = rank_dataset(
        res, tok, vocab.cls_id, seed=0, epoch=0, rank=0, world_size=2, batch_size=BATCH, cfg=CFG
    )
    # Compact records: uint16 gene ids + int8 bins = 3 bytes per token.
    want = (CFG.buffer_size + CFG.prefetch * CFG.task_cells) * 32 * 3
    assert ds.context.execution_options.resource_limits.object_store_memory == want


def test_a_read_task_ships_its_own_cells_only(resolved):
    res, vocab = resolved
    plan = rank_tasks(
        res,
        TokenizerConfig(max_seq_len=32),
        vocab.cls_id,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        batch_size=BATCH,
        start_batch=0,
        cfg=CFG,
    )
    assert len(plan.tasks) > 4
    alone = dataclasses.replace(plan, tasks=plan.tasks[:1])
    # Ray serializes each read task's function into the object store: its size must not grow with the
    # rest of the epoch (a function closing over the whole plan made every task carry every task's cells).
    assert len(cloudpickle.dumps(plan.reader(0))) == len(cloudpickle.dumps(alone.reader(0)))
    assert plan.reader(2)().equals(plan.read(2))
    # Ray read workers take X result buffers small enough to come from their heap, which TileDB leaves
    # untrimmed; a read in the consuming process keeps TileDB's defaults.
    worker_config = plan.reader(0).args[0].tiledb_config
    assert int(worker_config["soma.init_buffer_bytes"]) < int(
        READ_TASK_ENV["MALLOC_MMAP_THRESHOLD_"]
    )
    assert worker_config["sm.mem.malloc_trim"] == "false"
    assert plan.reader(0, worker=False).args[0].tiledb_config == plan.src.tiledb_config
    assert "sm.mem.malloc_trim" not in plan.src.tiledb_config
    # A setting of the source's own wins in the workers too.
    pinned = dataclasses.replace(
        plan,
        src=dataclasses.replace(
            plan.src, tiledb_config={**plan.src.tiledb_config, "soma.init_buffer_bytes": "1024"}
        ),
    )
    assert pinned.reader(0).args[0].tiledb_config["soma.init_buffer_bytes"] == "1024"


def test_stream_config_names_a_bad_size_and_splits_tiledb_threads_over_readers(resolved):
    with pytest.raises(ValueError, match="read_threads=0"):
        StreamConfig(read_threads=0)
    with pytest.raises(ValueError, match="less than two chunks"):
        StreamConfig(chunk_size=64, buffer_size=100)
    res, _ = resolved
    four_cpus = StreamConfig(read_task_cpus=4, read_threads=2)
    assert read_task_tiledb_config(res, four_cpus) == {"sm.compute_concurrency_level": "2"}
    assert read_task_tiledb_config(res, StreamConfig()) == {"sm.compute_concurrency_level": "1"}
    # The source's own TileDB setting wins.
    pinned = dataclasses.replace(res, tiledb_config={"sm.compute_concurrency_level": "8"})
    assert read_task_tiledb_config(pinned, four_cpus)["sm.compute_concurrency_level"] == "8"


def test_a_small_first_buffer_and_the_plan_stays_a_permutation():
    cfg = StreamConfig(chunk_size=16, buffer_size=256, first_buffer=40)
    assert buffer_starts(1000, cfg).tolist() == [0, 40, 296, 552, 808, 1000]
    assert buffer_starts(1000, dataclasses.replace(cfg, first_buffer=0)).tolist() == [
        0, 256, 512, 768, 1000
    ]  # fmt: skip
    ids = np.sort(np.random.default_rng(1).choice(5000, 1200, replace=False))
    plans = [
        rank_order(ids, seed=2, epoch=3, rank=r, world_size=2, batch_size=8, cfg=cfg)
        for r in (0, 1)
    ]
    both = np.concatenate(plans)
    assert len(both) == len(np.unique(both)) == 1200 and np.isin(both, ids).all()
    # A batch's cells come from one buffer or two adjacent ones; the first batches from the small first buffer.
    cells, pos, tasks = rank_plan(ids, seed=2, epoch=3, rank=0, world_size=2, batch_size=8, cfg=cfg)
    starts = buffer_starts(len(cells), cfg)
    chunk_rank = np.searchsorted(starts, np.arange(len(cells)), "right") - 1  # buffer of each cell
    assert (np.searchsorted(starts, pos, "right") - 1 == chunk_rank).all()  # positions stay in it
    for lo, hi in tasks:  # a read task never spans two buffers
        assert chunk_rank[lo] == chunk_rank[hi - 1]
    # The global order moves whole chunks: each chunk's cells stay together and in joinid order.
    order = epoch_order(ids, seed=2, epoch=3, chunk_size=16)
    assert np.array_equal(np.sort(order), ids)
    changes = np.flatnonzero(np.diff(order // 16)) + 1
    assert len(changes) == len(np.unique(ids // 16)) - 1
    assert all((np.diff(run) > 0).all() for run in np.split(order, changes))


def test_small_chunks_mix_a_grouped_experiment_about_as_well_as_a_uniform_shuffle():
    # 6,400 cells in 40 datasets of 160 consecutive joinids (rows grouped by dataset, as the census).
    ids = np.arange(6400)
    dataset = ids // 160
    kw = dict(seed=0, epoch=0, rank=0, world_size=1, batch_size=64)

    def tv(order):
        mix = np.full(40, 1 / 40)
        return np.mean(
            [
                0.5 * np.abs(np.bincount(b, minlength=40) / 64 - mix).sum()
                for b in order.reshape(-1, 64)
            ]
        )

    uniform = tv(dataset[np.random.default_rng(0).permutation(6400)])
    small = tv(dataset[rank_order(ids, cfg=StreamConfig(chunk_size=8, buffer_size=2048), **kw)])
    large = tv(dataset[rank_order(ids, cfg=StreamConfig(chunk_size=128, buffer_size=2048), **kw)])
    assert small <= 1.1 * uniform  # close to uniform ...
    assert (
        large > 1.3 * uniform
    )  # ... where large chunks are not (the statistic can tell them apart)


def test_the_stratified_chunk_order_deals_every_stratum_once_per_round():
    rng = np.random.default_rng(0)
    for n, w in ((1000, 64), (1003, 64), (50, 64), (64, 64)):
        perm = chunk_permutation(n, w, rng)
        assert np.array_equal(np.sort(perm), np.arange(n))  # every chunk once
        run = np.arange(n) * min(w, n) // n  # the stratum of each chunk
        for k in range(n // min(w, n)):  # each full round holds one chunk of every stratum
            assert len(np.unique(run[perm[k * min(w, n) : (k + 1) * min(w, n)]])) == min(w, n)
    again = chunk_permutation(1000, 64, np.random.default_rng(0))
    assert np.array_equal(chunk_permutation(1000, 64, np.random.default_rng(0)), again)
    assert np.array_equal(
        np.sort(chunk_permutation(10, 1, rng)), np.arange(10)
    )  # strata 1: uniform


def test_the_stratified_order_mixes_large_chunks_where_a_random_one_does_not():
    # 12,800 cells in 40 datasets of 320 consecutive joinids; chunks of 32 (10 per dataset), buffers of 64
    # chunks: a random chunk order leaves datasets out of each buffer, the stratified one holds them all.
    ids = np.arange(12800)
    dataset = ids // 320
    kw = dict(seed=0, epoch=0, rank=0, world_size=1, batch_size=64)

    def distinct(order):
        return np.mean([len(np.unique(b)) for b in dataset[order].reshape(-1, 64)])

    uniform = distinct(np.random.default_rng(0).permutation(12800)[: 12800 // 64 * 64])
    cfg = StreamConfig(chunk_size=32, buffer_size=2048, first_buffer=0)
    stratified = distinct(rank_order(ids, cfg=cfg, **kw))
    rand = distinct(rank_order(ids, cfg=dataclasses.replace(cfg, chunk_order="random"), **kw))
    # Measured: uniform 32.1 distinct datasets per batch, stratified 29.8 (93%), random 25.3 (79%).
    assert stratified >= 0.9 * uniform and stratified - rand >= 0.1 * uniform
    with pytest.raises(ValueError, match="chunk_order='sorted'"):
        StreamConfig(chunk_order="sorted")


def test_a_plan_that_cannot_shuffle_is_a_clear_error():
    ids = np.arange(100, 400)
    kw = dict(seed=0, epoch=0, rank=0, world_size=2, batch_size=16)
    with pytest.raises(ValueError, match="no cells"):
        rank_order(ids[:0], cfg=StreamConfig(), **kw)
    with pytest.raises(ValueError, match="smaller than one batch"):
        rank_order(ids, cfg=StreamConfig(chunk_size=4, buffer_size=8), **kw)
    with pytest.raises(ValueError, match="chunk_size=512 is larger than the selection"):
        rank_order(ids, cfg=StreamConfig(chunk_size=512, buffer_size=2048), **kw)


def test_the_first_buffer_read_in_process_gives_the_same_batches(ray_local, resolved):
    res, vocab = resolved
    tok = TokenizerConfig(max_seq_len=32)
    kw = dict(seed=4, epoch=1, rank=1, world_size=2, batch_size=BATCH)
    ray_only = dataclasses.replace(CFG, local_first_buffer=False)
    want = list(rank_batches(res, tok, vocab.cls_id, cfg=ray_only, **kw))
    got = list(rank_batches(res, tok, vocab.cls_id, cfg=CFG, **kw))
    assert len(got) == len(want) and all(a.equals(b) for a, b in zip(got, want, strict=True))
    resumed = list(rank_batches(res, tok, vocab.cls_id, cfg=CFG, start_batch=11, **kw))
    assert all(a.equals(b) for a, b in zip(resumed, want[11:], strict=True))
    # One buffer for the whole epoch: every read happens here, Ray Data reads nothing.
    whole = dataclasses.replace(CFG, buffer_size=4096, first_buffer=0)
    one = list(rank_batches(res, tok, vocab.cls_id, cfg=whole, **kw))
    assert [c for b in _ids(one) for c in b] == rank_order(res.joinids, cfg=whole, **kw).tolist()


def _read_workers() -> set[int]:
    """Ray worker processes started with the read tasks' environment (`READ_TASK_ENV`)."""
    from pathlib import Path

    marker = f"MALLOC_ARENA_MAX={READ_TASK_ENV['MALLOC_ARENA_MAX']}".encode()
    out = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::"):
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    out.add(int(proc.name))
        except OSError:
            pass
    return out


def test_prestarted_readers_serve_the_stream_and_change_nothing(ray_local, resolved):
    import os
    import signal
    import time

    res, vocab = resolved
    tok = TokenizerConfig(max_seq_len=32)
    kw = dict(seed=5, epoch=0, rank=0, world_size=2, batch_size=BATCH)
    want = list(rank_batches(res, tok, vocab.cls_id, cfg=CFG, **kw))
    # Idle read workers of earlier streams would serve this one too: without them, a stream whose tasks
    # did not fit the warm workers (another runtime environment, say) would have to start its own.
    old = _read_workers()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while _read_workers() & old and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # for the raylet to see them gone, not hand them a warm-up
    warm = prestart_readers(res, tok, vocab.cls_id, CFG)
    warm.wait()
    assert len(warm.pids) == CFG.prefetch and os.getpid() not in warm.pids
    before = _read_workers()
    assert set(warm.pids) <= before
    got = list(rank_batches(res, tok, vocab.cls_id, cfg=CFG, warm=warm, **kw))
    assert len(got) == len(want) and all(a.equals(b) for a, b in zip(got, want, strict=True))
    # The stream's read tasks went to warm workers: it started no read worker process of its own.
    assert _read_workers() <= before

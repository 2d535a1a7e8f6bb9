"""`python -m jobs.bench data`: loader throughput and memory, side by side on one synthetic census.

Readers of the same first `--cells-read` cells of the experiment, each in its own subprocess so peak memory
(the process tree's summed PSS, its physical memory, and summed RSS, which counts pages shared between
processes such as Ray's object store once per process; see `jobs.bench.memory.PeakMemory`) is separate:

- `raw`: SOMA X rows read in contiguous 8192-row blocks (`X.read(coords=(rows,)).tables()`) into Arrow and
  dropped: the limit.
- `soma-ml`: TileDB-SOMA-ML `ExperimentDataset` (dense X batches, its default shuffle) through
  `experiment_dataloader`.
- `ours`: `data_ingest.stream.rank_batches` (Ray Data read tasks, scatter-gather shuffle, tokenization).
  Its read workers are started and warmed before the timer (`prestart_readers`, `prestart_s` in the JSON),
  as training does while it builds the model and as the other readers import and open before theirs.
- `ours-cold` (not by default): the same, timed from cold: the epoch starts its read workers itself.
- `ours-cached` (not by default): the same stream's epoch 1 served from its Arrow token cache, filled by a
  whole epoch 0 (reported as `fill s`).

Shuffle quality is the mean number of distinct datasets in a batch and the mean total-variation distance
between a batch's dataset mix and the global one, each against an ideal uniform shuffle of the same cells.
Not a timed test: run it by hand and paste the table into the README.

    python -m data_ingest.synth --out /tmp/bench/census100k --cells 100000 --genes 20000
    python -m jobs.bench data --census /tmp/bench/census100k
    # a larger experiment from copies of a smaller one (see jobs.bench.tile), shuffled readers capped:
    python -m jobs.bench data --census /tmp/bench/census1m --tile-from /tmp/bench/census100k --copies 10 \
        --max-batches 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_ingest import keys
from data_ingest.cache import TokenCacheConfig
from data_ingest.source import ALL, SomaCellSource, SourceConfig
from data_ingest.stream import StreamConfig, StreamStats, prestart_readers, rank_batches
from data_ingest.stream.config import CHUNK_ORDERS
from data_ingest.synth.census import CensusSynthConfig, experiment_uri, write_synthetic_census
from data_ingest.tokenize import TokenizerConfig
from data_ingest.vocab import GeneVocab
from jobs.bench.memory import PeakMemory
from jobs.bench.tile import tile_census

READERS = ("raw", "soma-ml", "ours", "ours-cold", "ours-cached")


def _distinct(per_batch: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(b)) for b in per_batch])) if per_batch else 0.0


def _tv(per_batch: list[np.ndarray]) -> float:
    """Mean total-variation distance between each batch's dataset mix and the mix of all the batches
    together: 0 when every batch has the global proportions; a uniform shuffle's value (`ideal_tv`) is the
    floor a finite batch allows. Unlike distinct datasets per batch it also sees a batch that touches many
    datasets but is dominated by one."""
    if not per_batch:
        return 0.0
    labels, codes = np.unique(np.concatenate(per_batch), return_inverse=True)
    k = len(labels)
    overall = np.bincount(codes, minlength=k) / len(codes)
    tvs, at = [], 0
    for b in per_batch:
        c = codes[at : at + len(b)]
        at += len(b)
        tvs.append(0.5 * np.abs(np.bincount(c, minlength=k) / len(c) - overall).sum())
    return float(np.mean(tvs))


def run_raw(exp_uri: str, n_cells: int, batch_size: int) -> dict:
    import tiledbsoma

    cells = 0
    with tiledbsoma.Experiment.open(exp_uri) as exp:
        X = exp.ms[keys.MEASUREMENT_RNA].X[keys.RAW_LAYER]
        t0 = time.perf_counter()
        block = 8192
        for lo in range(0, n_cells, block):
            hi = min(lo + block, n_cells)
            for _ in X.read(coords=(slice(lo, hi - 1),)).tables():
                pass  # decoded into Arrow and dropped: nothing else is done with the data
            cells += hi - lo
        dt = time.perf_counter() - t0
        ds = exp.obs.read(
            coords=(slice(0, n_cells - 1),), column_names=[keys.OBS_DATASET]
        ).concat()[keys.OBS_DATASET]
    labels = np.asarray(ds.to_pylist())
    batches = [labels[i : i + batch_size] for i in range(0, n_cells - batch_size + 1, batch_size)]
    return {"cells": cells, "seconds": dt, "distinct": _distinct(batches), "tv": _tv(batches)}


def run_soma_ml(exp_uri: str, n_cells: int, batch_size: int, max_batches: int) -> dict:
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    cells, per_batch = 0, []
    with tiledbsoma.Experiment.open(exp_uri) as exp:
        query = exp.axis_query(
            keys.MEASUREMENT_RNA,
            obs_query=tiledbsoma.AxisQuery(coords=(slice(0, n_cells - 1),)),
        )
        t0 = time.perf_counter()
        ds = ExperimentDataset(
            query,
            layer_name=keys.RAW_LAYER,
            obs_column_names=[keys.OBS_DATASET],
            batch_size=batch_size,
            shuffle=True,
            seed=0,
        )
        for i, (X, obs) in enumerate(experiment_dataloader(ds)):
            if i == 0:
                t_first, first = time.perf_counter() - t0, X.shape[0]
            cells += X.shape[0]
            per_batch.append(obs[keys.OBS_DATASET].to_numpy())
            if max_batches and i + 1 >= max_batches:
                break
        dt = time.perf_counter() - t0
    return {
        "cells": cells,
        "seconds": dt,
        "distinct": _distinct(per_batch),
        "tv": _tv(per_batch),
        "first_batch_s": t_first,
        "steady_cells_per_s": (cells - first) / max(dt - t_first, 1e-9),
    }


def run_ours(
    exp_uri: str,
    n_cells: int,
    batch_size: int,
    max_seq_len: int,
    cpus: int,
    max_batches: int,
    chunk_size: int = 0,
    chunk_order: str = "",
    buffer_size: int = 0,
    cache_dir: str | None = None,
    object_store_mb: int = 0,
    prefetch: int = 0,
    task_cells: int = 0,
    read_threads: int = 0,
    first_buffer: int = -1,
    local_first_buffer: bool = True,
    cold_start: bool = False,
) -> dict:
    """Our stream, timed over epoch 0; with `cache_dir`, epoch 0 fills the token cache (timed as
    `fill_seconds`) and the result is epoch 1, served from the cache.

    As in training, where the read workers start while the model is built (`prestart_readers`), they are
    started and warmed before the timer (`prestart_s`, not timed), the way the other readers import their
    libraries and open the experiment before theirs; `cold_start` times an epoch that starts them itself."""
    import ray

    # Ray starts its workers at niceness 15; the other readers run at 0. On a shared machine that alone
    # would starve our read tasks, so compare at equal priority.
    ray.init(
        num_cpus=cpus,
        object_store_memory=object_store_mb * 2**20 or None,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": 0},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    src = SomaCellSource(
        SourceConfig(soma_uri=exp_uri, value_filter=f"soma_joinid < {n_cells}", holdout_fraction=0)
    )
    vocab = GeneVocab.from_genes(src.gene_names())
    resolved = src.resolve(vocab, ALL)
    tok = TokenizerConfig(max_seq_len=max_seq_len)
    prefetch = prefetch or StreamConfig.prefetch
    cfg = StreamConfig(
        prefetch=prefetch,
        read_task_cpus=cpus / prefetch,
        read_threads=read_threads or max(1, cpus // prefetch),
    )
    cfg.chunk_size = chunk_size or cfg.chunk_size
    cfg.chunk_order = chunk_order or cfg.chunk_order
    cfg.buffer_size = buffer_size or cfg.buffer_size
    cfg.task_cells = task_cells or cfg.task_cells
    if first_buffer >= 0:
        cfg.first_buffer = first_buffer
    cfg.local_first_buffer = local_first_buffer
    if cache_dir:
        cfg.token_cache = TokenCacheConfig(dir=cache_dir)
    warm, prestart_s = None, 0.0
    if not cold_start:
        t0 = time.perf_counter()
        warm = prestart_readers(resolved, tok, vocab.cls_id, cfg)
        warm.wait()
        prestart_s = time.perf_counter() - t0

    def epoch(e: int, limit: int) -> dict:
        stats = StreamStats()
        cells, per_batch = 0, []
        t0 = time.perf_counter()
        it = rank_batches(
            resolved,
            tok,
            vocab.cls_id,
            seed=0,
            epoch=e,
            rank=0,
            world_size=1,
            batch_size=batch_size,
            cfg=cfg,
            stats=stats,
            warm=warm,
        )
        for i, table in enumerate(it):
            if i == 0:
                t_first, first = time.perf_counter() - t0, table.num_rows
            cells += table.num_rows
            per_batch.append(table[keys.BATCH].to_numpy())
            if limit and i + 1 >= limit:
                break
        dt = time.perf_counter() - t0
        it.close()  # stop the read tasks still in flight
        return {
            "cells": cells,
            "seconds": dt,
            "distinct": _distinct(per_batch),
            "tv": _tv(per_batch),
            "skipped": stats.skipped_cells,
            "first_batch_s": t_first,
            "steady_cells_per_s": (cells - first) / max(dt - t_first, 1e-9),
            "prestart_s": prestart_s,
        }

    if not cache_dir:
        return epoch(0, max_batches)
    fill = epoch(0, 0)  # the whole epoch, so every shard is built
    out = epoch(1, max_batches)
    out["fill_seconds"] = fill["seconds"]
    return out


def ideal_mixing(exp_uri: str, n_cells: int, batch_size: int, seed: int = 0) -> tuple[float, float]:
    """(distinct datasets per batch, mean TV distance) of a uniform shuffle of the first `n_cells`."""
    import tiledbsoma

    with tiledbsoma.Experiment.open(exp_uri) as exp:
        labels = np.asarray(
            exp.obs.read(coords=(slice(0, n_cells - 1),), column_names=[keys.OBS_DATASET])
            .concat()[keys.OBS_DATASET]
            .to_pylist()
        )
    perm = np.random.default_rng(seed).permutation(len(labels))
    n = len(labels) // batch_size * batch_size
    batches = list(labels[perm[:n]].reshape(-1, batch_size))
    return _distinct(batches), _tv(batches)


def _reader_spec(reader: str) -> tuple[str, int, int, str]:
    """(reader, chunk_size, buffer_size, chunk_order) of a `--readers` entry: `ours`, `ours-cold` and
    `ours-cached` may name their own chunk and buffer as `ours:CHUNK:BUFFER` (0 for the --chunk-size /
    --buffer-size value), and
    the chunk order as `ours:CHUNK:BUFFER:ORDER` (`stratified` or `random`; default the --chunk-order
    value), so several shuffle settings run side by side in one benchmark."""
    name, *rest = reader.split(":")
    if name not in READERS or (
        rest
        and (
            not name.startswith("ours")
            or len(rest) not in (2, 3)
            or (len(rest) == 3 and rest[2] not in CHUNK_ORDERS)
        )
    ):
        raise ValueError(
            f"unknown reader {reader!r}: use one of {', '.join(READERS)}, or ours:CHUNK:BUFFER / "
            "ours-cached:CHUNK:BUFFER, optionally :stratified or :random (e.g. ours:256:131072:random)"
        )
    chunk, buffer = (int(x) for x in rest[:2]) if rest else (0, 0)
    return name, chunk, buffer, rest[2] if len(rest) == 3 else ""


def _worker(a: argparse.Namespace) -> int:
    cpu0 = time.process_time()
    with PeakMemory(every_s=a.memory_every) as mem:
        if a.worker == "raw":
            n_raw = min(a.cells_read, a.max_batches * a.batch_size or a.cells_read)
            out = run_raw(a.exp, n_raw, a.batch_size)
        elif a.worker == "soma-ml":
            out = run_soma_ml(a.exp, a.cells_read, a.batch_size, a.max_batches)
        else:
            cache = (
                tempfile.mkdtemp(prefix="bench-token-cache-") if a.worker == "ours-cached" else None
            )
            try:
                out = run_ours(
                    a.exp,
                    a.cells_read,
                    a.batch_size,
                    a.max_seq_len,
                    a.cpus,
                    a.max_batches,
                    a.chunk_size,
                    a.chunk_order,
                    a.buffer_size,
                    cache,
                    a.object_store_mb,
                    a.prefetch,
                    a.task_cells,
                    a.read_threads,
                    a.first_buffer,
                    not a.no_local_first_buffer,
                    a.worker == "ours-cold",
                )
                if cache:
                    out["cache_mb"] = sum(f.stat().st_size for f in Path(cache).rglob("*")) / 2**20
            finally:
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)
    out["peak_rss_mb"] = mem.peak_rss / 2**20
    out["peak_pss_mb"] = mem.peak_pss / 2**20
    out["pss_samples"] = mem.pss_samples
    out["pss_by_process_mb"] = {k: v / 2**20 for k, v in sorted(mem.peak_pss_by_name.items())}
    out["consumer_shmem_mb"] = mem.peak_own_shmem / 2**20  # object-store pages the reader mapped
    out["consumer_anon_mb"] = mem.peak_own_anon / 2**20  # its own heap
    # CPU of the consuming process (all its threads: Ray Data's executor, the batcher, the local first
    # buffer, the memory sampler; ours-cached: both epochs), against `seconds` of wall time on `--cpus` cores.
    out["consumer_cpu_s"] = time.process_time() - cpu0
    print("RESULT " + json.dumps(out), flush=True)
    if a.worker.startswith("ours"):
        import ray

        ray.shutdown()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench data", description=__doc__.split("\n")[0]
    )
    p.add_argument("--census", default="outputs/bench/census", help="synthetic census collection")
    p.add_argument(
        "--cells", type=int, default=100_000, help="cells to generate if --census is new"
    )
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--organism", default=keys.DEFAULT_ORGANISM)
    p.add_argument(
        "--tile-from",
        default=None,
        help="build a new --census as back-to-back copies of this census (see tile_census)",
    )
    p.add_argument("--copies", type=int, default=10, help="copies for --tile-from")
    p.add_argument("--cells-read", type=int, default=0, help="cells each reader reads (0 = all)")
    p.add_argument(
        "--max-batches", type=int, default=0, help="stop shuffled readers after this many"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs for our pipeline")
    p.add_argument(
        "--prefetch",
        type=int,
        default=0,
        help="our read tasks running at once, sharing --cpus (0 = StreamConfig default)",
    )
    p.add_argument(
        "--read-threads",
        type=int,
        default=0,
        help="X query threads per read task (0 = --cpus / --prefetch, one TileDB thread each)",
    )
    p.add_argument(
        "--object-store-mb",
        type=int,
        default=0,
        help="Ray object store size for our pipeline (0 = Ray's default, 30%% of RAM); bounds the store's "
        "share of the measured memory",
    )
    p.add_argument(
        "--chunk-size", type=int, default=0, help="our stream's chunk (0 = StreamConfig default)"
    )
    p.add_argument(
        "--buffer-size", type=int, default=0, help="our stream's buffer (0 = StreamConfig default)"
    )
    p.add_argument(
        "--chunk-order",
        choices=CHUNK_ORDERS,
        default=StreamConfig.chunk_order,
        help="our stream's chunk order (StreamConfig.chunk_order)",
    )
    p.add_argument(
        "--first-buffer",
        type=int,
        default=-1,
        help="our stream's first buffer (0 = as large as the others, -1 = StreamConfig default)",
    )
    p.add_argument(
        "--no-local-first-buffer",
        action="store_true",
        help="our stream reads its first buffer with Ray Data too (StreamConfig.local_first_buffer off)",
    )
    p.add_argument(
        "--task-cells", type=int, default=0, help="our read task size (0 = StreamConfig default)"
    )
    p.add_argument(
        "--readers",
        default="raw,soma-ml,ours",
        help=f"comma-separated, from {', '.join(READERS)}, or ours:CHUNK:BUFFER for our stream with "
        "another chunk and buffer size, ours:CHUNK:BUFFER:random with the uniform chunk order "
        "(ours-cached: epoch 1 from a token cache filled by a whole epoch 0 in a temporary directory)",
    )
    p.add_argument(
        "--memory-every",
        type=float,
        default=0.05,
        help="seconds between samples of the reader's memory (RSS; PSS every 10th sample and near peaks)",
    )
    p.add_argument("--json-out", default=None)
    p.add_argument("--worker", choices=READERS, help=argparse.SUPPRESS)
    p.add_argument("--exp", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return _worker(a)

    census = Path(a.census)
    if not census.exists() and a.tile_from:
        print(f"writing {a.copies} copies of {a.tile_from} to {census}")
        tile_census(a.tile_from, census, a.copies)
    elif not census.exists():
        print(f"writing a synthetic census of {a.cells} cells x {a.genes} genes to {census}")
        write_synthetic_census(census, CensusSynthConfig(n_cells=a.cells, n_genes=a.genes))
    exp = experiment_uri(census.resolve(), a.organism)
    import tiledbsoma

    with tiledbsoma.Experiment.open(exp) as e:
        n_total = int(e.obs.count)
        n_genes = int(e.ms[keys.MEASUREMENT_RNA].var.count)
    n = a.cells_read or n_total
    rows = {}
    for reader in a.readers.split(","):
        _reader_spec(reader)  # a typo fails now, not after the first readers ran
    for reader in a.readers.split(","):
        base, chunk, buffer, order = _reader_spec(reader)
        cmd = [sys.executable, "-m", "jobs.bench", "data", "--worker", base, "--exp", exp]
        cmd += ["--cells-read", str(n), "--batch-size", str(a.batch_size)]
        cmd += ["--max-seq-len", str(a.max_seq_len), "--cpus", str(a.cpus)]
        cmd += ["--max-batches", str(a.max_batches)]
        cmd += ["--chunk-size", str(chunk or a.chunk_size)]
        cmd += ["--chunk-order", order or a.chunk_order]
        cmd += ["--buffer-size", str(buffer or a.buffer_size)]
        cmd += ["--object-store-mb", str(a.object_store_mb), "--prefetch", str(a.prefetch)]
        cmd += ["--task-cells", str(a.task_cells), "--read-threads", str(a.read_threads)]
        cmd += ["--first-buffer", str(a.first_buffer), "--memory-every", str(a.memory_every)]
        cmd += ["--no-local-first-buffer"] if a.no_local_first_buffer else []
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"bench reader {reader!r} failed (exit {res.returncode})")
        if res.returncode:  # measured, then failed while shutting down: keep the measurement
            print(
                f"note: reader {reader!r} exited {res.returncode} after its result", file=sys.stderr
            )
        r = json.loads(line[0][len("RESULT ") :])
        r["cells_per_s"] = r["cells"] / r["seconds"]
        rows[reader] = r
    ideal, ideal_tv = ideal_mixing(exp, n, a.batch_size)
    print(
        f"\nexperiment {exp}: {n_total} cells x {n_genes} genes; each reader reads {n} cells"
        f"{f' (shuffled readers stop after {a.max_batches} batches)' if a.max_batches else ''}; "
        f"batch {a.batch_size}, max_seq_len {a.max_seq_len}\n"
    )
    print(
        "| reader | cells | seconds | cells/s | first batch (s) | cells/s after first batch "
        "| peak PSS (MB) | peak RSS (MB) | distinct datasets / batch | TV to the global mix |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        steady = r.get("steady_cells_per_s", r["cells_per_s"])
        print(
            f"| {name} | {r['cells']} | {r['seconds']:.1f} | {r['cells_per_s']:.0f} | "
            f"{r.get('first_batch_s', 0):.1f} | {steady:.0f} | {r['peak_pss_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{r['distinct']:.2f} | {r['tv']:.3f} |"
        )
    print(f"| ideal uniform shuffle | | | | | | | | {ideal:.2f} | {ideal_tv:.3f} |")
    if "ours-cached" in rows:
        r = rows["ours-cached"]
        print(
            f"\nours-cached: epoch 0 filled the token cache in {r['fill_seconds']:.1f} s "
            f"({a.cells_read or n_total} cells, {r['cache_mb']:.0f} MB on disk); the row above is epoch 1 "
            "from the cache"
        )
    print()
    for name, r in rows.items():
        if not name.startswith("ours"):
            continue
        ratios = [f"distinct {r['distinct'] / ideal:.0%} of uniform (target >= 95%)"]
        ratios.append(f"TV {r['tv'] / ideal_tv:.2f}x uniform's (target <= 1.10x)")
        if "soma-ml" in rows:
            ratios.append(
                f"{r['cells_per_s'] / rows['soma-ml']['cells_per_s']:.2f}x TileDB-SOMA-ML"
            )
        if "raw" in rows:
            ratios.append(f"{r['cells_per_s'] / rows['raw']['cells_per_s']:.0%} of the raw read")
        print(f"{name}: " + ", ".join(ratios))
    if a.json_out:
        Path(a.json_out).write_text(
            json.dumps({"n_cells": n, "rows": rows, "ideal": ideal, "ideal_tv": ideal_tv})
        )
    return 0

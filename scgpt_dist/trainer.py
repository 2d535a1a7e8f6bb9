"""Distributed pretraining on Ray Train + DeepSpeed.

`run_pretraining(cfg)` runs on the driver: it resolves the cells and the vocabulary, opens (or continues) the
MLflow run, and launches `train_loop_per_worker` on `train.num_workers` Ray Train workers. Each worker streams
its own share of the cells with Ray Data (`data_ingest.stream.rank_batches`: deterministic per (seed, epoch,
rank), so resuming is exact). The loop owns the counters; `TrainModule` owns the model and the step;
callbacks log and checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
import torch.distributed as dist

from data_ingest.datasource import attach_batch_profile
from data_ingest.keys import BATCH, CELL_ID, GENES, LABEL, MODALITY, PAD_VALUE, VALUES
from data_ingest.source import TRAIN, SomaCellSource
from data_ingest.stream import StreamStats, rank_batches
from data_ingest.tokenize import RECORD_SCHEMA, VIEW_COLUMNS, mix64
from data_ingest.vocab import GeneVocab
from scgpt_dist.callbacks import (
    CheckpointCallback,
    EvalCallback,
    MlflowCallback,
    ProgressCallback,
    write_worker_info,
)
from scgpt_dist.checkpoint import (
    CHECKPOINTS_DIR,
    consolidate,
    find_latest_checkpoint,
    open_checkpoint,
    prune_checkpoints,
    read_meta,
    read_vocab,
)
from scgpt_dist.config import ExperimentConfig, dump_config, flatten, from_dict, to_dict
from scgpt_dist.lineage import joinid_digest, log_lineage
from scgpt_dist.model.collate import collate
from scgpt_dist.preemption import (
    STALL_PHASES,
    SigtermRelay,
    StallWatchdog,
    StopFlag,
    StopWatcher,
    clear_stall_reports,
    stall_reports,
)
from scgpt_dist.storage import Store
from scgpt_dist.storage import resolve as resolve_storage
from scgpt_dist.tracking import start_or_resume_run, tracking_uri

log = logging.getLogger(__name__)

STATE_KEYS = ("step", "tokens_seen", "cells_seen", "cells_skipped", "epoch", "batches_in_epoch")


@dataclass
class TrainState:
    """Counters owned by the loop; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    cells_seen: int = 0
    cells_skipped: int = 0
    """Cells the tokenizer dropped (too few expressed genes), over all ranks."""
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches this rank consumed in the current epoch (the data position)."""

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in STATE_KEYS}

    def load_state_dict(self, d: dict) -> None:
        for k in STATE_KEYS:
            setattr(self, k, int(d.get(k, 0)))


@dataclass
class _Window:
    """Accumulates metrics between two log points."""

    loss: float = 0.0
    parts: dict = field(default_factory=dict)
    n: int = 0
    tokens: int = 0
    cells: int = 0
    wait: float = 0.0
    skipped: int = 0
    cells_digest: int = 0
    t0: float = field(default_factory=time.perf_counter)


DIGEST_MOD = 1 << 20


def cells_digest(cell_ids: torch.Tensor) -> int:
    """An order-free digest of a set of cell ids (soma_joinid), in [0, DIGEST_MOD): the sum of a 20-bit
    hash of each. Summed over the ranks and a log window it is the `cells_digest` metric, so two runs (an
    interrupted and resumed one, an uninterrupted one) can be checked to have trained on the same cells at
    each log step."""
    ids = cell_ids.numpy().astype(np.int64).astype(np.uint64)
    return int((mix64(ids) >> np.uint64(44)).sum(dtype=np.uint64)) % DIGEST_MOD


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    from scgpt_dist.train_module import TrainModule

    cfg: ExperimentConfig = from_dict(ExperimentConfig, loop_config["config"])
    vocab = GeneVocab(loop_config["vocab"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.torch_threads)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per stream buffer otherwise
    # We turned Ray Data's bars off on purpose (the progress line says what happens): no notice each epoch.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # DeepSpeed's ZeRO calls a torch collective torch has renamed; one warning per rank and step otherwise.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    write_worker_info(cfg.output_dir, rank)

    module = TrainModule(cfg, vocab, world, rank)
    state = TrainState()
    replay = []
    with _resume_dir(loop_config["storage"]) as resume:
        if resume is not None:
            state.load_state_dict(module.load(str(resume))["train_state"])
            replay = _meta(resume).get("pending_metrics", [])
            log.info("rank %d resumed from %s at step %d", rank, resume, state.step)
        elif cfg.train.init_from:
            from scgpt_dist.warmstart import load_into_engine

            load_into_engine(module.engine, cfg.train.init_from)  # a collective under ZeRO-3
            log.info("rank %d warm-started from %s", rank, cfg.train.init_from)

    mlflow_cb = monitor = None
    if rank == 0:
        mlflow_cb = MlflowCallback(loop_config["tracking_uri"], loop_config["run_id"])
        mlflow_cb.replay(replay)
        if cfg.mlflow.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                loop_config["run_id"],
                sampling_interval=10,
                resume_logging=True,
                tracking_uri=loop_config["tracking_uri"],
            )
            monitor.start()
    try:
        _train(cfg, vocab, module, state, mlflow_cb, rank, world, loop_config)
    finally:
        if monitor is not None:
            monitor.finish()


def _train(cfg, vocab, module, state, mlflow_cb, rank, world, loop_config) -> None:
    """The step loop, watched for stalls (`train.stall_timeout_s`)."""
    watchdog = StallWatchdog(cfg.train.stall_timeout_s, rank, str(Path(cfg.output_dir) / "workers"))
    watchdog.start()
    try:
        _loop(cfg, vocab, module, state, mlflow_cb, rank, world, loop_config, watchdog)
    finally:
        watchdog.stop()


def _loop(cfg, vocab, module, state, mlflow_cb, rank, world, loop_config, watchdog) -> None:
    """data -> micro-steps -> counters, logging and checkpoints; stops early on a stop request."""
    storage: Store = loop_config["storage"]
    ckpt_cb = CheckpointCallback(cfg, vocab, rank, world, loop_config["data_info"], storage)
    stop_at = min(cfg.train.max_steps, cfg.train.stop_after_steps or cfg.train.max_steps)
    resolved = loop_config["resolved"]
    stats = StreamStats()
    win = _Window()
    progress = (
        ProgressCallback(stop_at, state.step, cfg.train.progress_every_s) if rank == 0 else None
    )
    stopper = StopWatcher(
        loop_config.get("stop_flag"), rank, cfg.train.stop_poll_s, cfg.train.on_node_drain
    )
    eval_cb = None
    if loop_config.get("eval_set") is not None:
        eval_cb = EvalCallback(cfg, loop_config["eval_set"], rank, world, vocab.pad_id)
        if state.step == 0:  # the model at initialisation: what training has to beat
            watchdog.beat("eval", state.step)
            eval_cb.run(module.engine.module, 0, mlflow_cb)

    while state.step < stop_at:
        # Each rank's stream is a pure function of (seed, epoch, rank, world): resuming passes the data
        # position (batches already consumed in this epoch) and continues exactly where it stopped.
        batches = rank_batches(
            resolved,
            cfg.data.tokenizer,
            vocab.cls_id,
            seed=cfg.train.seed,
            epoch=state.epoch,
            rank=rank,
            world_size=world,
            batch_size=cfg.train.micro_batch_size,
            start_batch=state.batches_in_epoch,
            cfg=cfg.data.stream,
            stats=stats,
        )
        watchdog.beat("data", state.step)
        t_wait = time.perf_counter()
        for table in batches:
            win.wait += time.perf_counter() - t_wait
            watchdog.beat("step", state.step)
            if table.num_rows == 0:  # every cell skipped: a no-op step keeps the ranks in lockstep
                table = _cls_only_table(vocab.cls_id)
            # The mask seed is the data position, so a resumed run masks exactly as an uninterrupted one.
            batch = collate(table, vocab.pad_id)
            out = module.micro_step(batch, (state.epoch, state.batches_in_epoch))
            win.cells_digest = (win.cells_digest + cells_digest(batch.cell_id)) % DIGEST_MOD
            state.batches_in_epoch += 1
            win.loss += out.loss
            win.n += 1
            win.tokens += out.n_tokens
            win.cells += out.n_cells
            win.skipped = stats.skipped_cells
            for k, v in out.parts.items():
                win.parts[k] = win.parts.get(k, 0.0) + v
            if out.boundary:
                state.step += 1
                action = stopper.poll()  # a collective: every rank, every step
                preempted = action == "stop"
                save = ckpt_cb.due(state.step) or state.step == stop_at or action is not None
                if preempted and rank == 0:
                    log.warning("stopping after step %d (%s)", state.step, stopper.reason)
                elif action == "checkpoint" and rank == 0:
                    log.warning(
                        "%s: checkpoint at step %d, training goes on; when the node goes, Ray Train "
                        "restarts the workers and they resume from it",
                        stopper.reason,
                        state.step,
                    )
                if eval_cb is not None and not preempted and eval_cb.due(state.step, stop_at):
                    watchdog.beat("eval", state.step)
                    eval_cb.run(module.engine.module, state.step, mlflow_cb)
                if save or state.step % cfg.train.log_every == 0:
                    window_loss = _flush_window(cfg, state, win, module, mlflow_cb, world, progress)
                    stats.skipped_cells = 0
                    win = _Window()
                if save:
                    watchdog.beat("checkpoint", state.step)
                    pending = mlflow_cb.pending() if mlflow_cb is not None else []
                    path = ckpt_cb.save(
                        module,
                        state.state_dict(),
                        {
                            "step": state.step,
                            "loss": window_loss,
                            "preempted": int(preempted),
                            "node_drain": int(action == "checkpoint"),
                        },
                        pending,
                    )
                    if rank == 0:
                        mlflow_cb.commit({"checkpoint.latest": path, "step": state.step})
                        prune_checkpoints(
                            storage,
                            cfg.train.keep_checkpoints,
                            cfg.train.keep_best_checkpoint,
                        )
                if state.step >= stop_at or preempted:
                    break
            watchdog.beat("data", state.step)
            t_wait = time.perf_counter()
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
            continue
        break


def _cls_only_table(cls_id: int) -> pa.Table:
    """One record holding only `<cls>` (and so do its thinned views): nothing to mask, so its loss and
    gradients are zero."""
    schema = RECORD_SCHEMA
    record = {GENES: [cls_id], VALUES: [PAD_VALUE], BATCH: 0, MODALITY: 0, CELL_ID: -1, LABEL: -1}
    for name, key in zip(VIEW_COLUMNS, (GENES, VALUES) * 2, strict=True):
        schema = schema.append(RECORD_SCHEMA.field(key).with_name(name))
        record[name] = record[key]
    return pa.Table.from_pylist([record], schema=schema)


@contextlib.contextmanager
def _resume_dir(storage: Store):
    """The newest complete checkpoint in the storage (by our manifests: the only record of checkpoints;
    Ray Train is never told about them), as a local directory, or None. An incomplete or corrupt newest one
    is skipped for the previous complete one. A checkpoint on an object store is downloaded to a temporary
    directory for the block."""
    on_disk = find_latest_checkpoint(storage)
    if on_disk is None:
        yield None
        return
    with open_checkpoint(on_disk, verify=False) as local:  # validated by find_latest_checkpoint
        yield local


def _meta(path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def _flush_window(
    cfg, state: TrainState, win: _Window, module, mlflow_cb, world: int, progress=None
) -> float:
    """Sum the window's counters over ranks (a collective: every rank calls it at the same steps), add them
    to the global counters, and on rank 0 log the window to MLflow and the console. Returns the window's
    mean loss."""
    names = sorted(win.parts)
    elapsed = time.perf_counter() - win.t0
    summed = _all_reduce_sum(
        [win.loss, win.n, win.tokens, win.cells, win.wait, elapsed, win.skipped, win.cells_digest]
        + [win.parts[k] for k in names]
    )
    loss, n, tokens, cells, wait, elapsed_sum, skipped, digest = summed[:8]
    state.tokens_seen += int(tokens)
    state.cells_seen += int(cells)
    state.cells_skipped += int(skipped)
    if mlflow_cb is None:
        return loss / max(n, 1)
    elapsed_mean = elapsed_sum / world
    metrics = {
        "loss": loss / max(n, 1),
        "lr": module.lr,
        "grad_norm": module.grad_norm(),
        "tokens_per_s": tokens / max(elapsed_mean, 1e-9),
        "cells_per_s": cells / max(elapsed_mean, 1e-9),
        "data_wait_fraction": wait / max(elapsed_sum, 1e-9),
        "tokens_seen": state.tokens_seen,
        "cells_skipped": state.cells_skipped,
        "epoch": state.epoch,
        "cells_digest": int(digest) % DIGEST_MOD,
    }
    for k, v in zip(names, summed[8:], strict=True):
        metrics[f"loss_{k}"] = v / max(n, 1)
    if cfg.train.peak_tflops_per_worker:
        seq = tokens / max(cells, 1)
        achieved = module.engine.module.flops_per_token(seq) * metrics["tokens_per_s"]
        metrics["mfu"] = achieved / (cfg.train.peak_tflops_per_worker * 1e12 * world)
    mlflow_cb.log(state.step, metrics)
    if progress is not None:
        progress.update(state.step, metrics)
    return metrics["loss"]


# ------------------------------------------------------------------------------------------------ driver


def init_ray(cfg: ExperimentConfig) -> bool:
    """Connect to the configured cluster, to $RAY_ADDRESS (set by `ray job submit`), or start a local one.
    Returns whether the cluster is one this process connected to (not a local instance it started)."""
    if ray.is_initialized():
        return True
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    num_cpus = cfg.ray.num_cpus or (os.cpu_count() or 1) + cfg.train.num_workers
    start_local_ray(num_cpus)
    return False


def start_local_ray(num_cpus: int) -> None:
    """A single-node Ray instance on loopback, with the dashboard (the state API) on 127.0.0.1.

    Ray Train's placement-group cleaner asks the state API every few seconds whether the train controller is
    alive; without a dashboard every query fails and it logs a warning each time, for the whole run. On one
    node there is no node to drain, so Ray Train's preemption watcher (an actor per worker group that polls
    for node drains) is switched off; on a real cluster (`ray.address`, `ray job submit`) it stays on."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        _node_ip_address="127.0.0.1",  # a local cluster stays on loopback
    )


def check_cluster_resources(cfg: ExperimentConfig, local: bool) -> str | None:
    """What the run needs against what the cluster has (`ray.resource_check`); returns the problem or None.

    Training workers hold their CPUs for the whole run and each rank's stream needs read tasks beside them:
    with no CPU left for one read task the run waits forever (Ray logs "cluster resources are not enough"
    and nothing fails)."""
    mode = cfg.ray.resource_check
    if mode == "auto":
        mode = "error" if local else "warn"
    if mode == "ignore":
        return None
    if mode not in ("error", "warn"):
        raise ValueError(f"ray.resource_check={mode!r}; use auto, error, warn or ignore")
    have = ray.cluster_resources()
    w, per_worker = cfg.train.num_workers, cfg.train.cpus_per_worker
    read = cfg.data.stream.read_task_cpus
    need_cpu = w * per_worker + read
    problem = None
    if cfg.train.use_gpu and have.get("GPU", 0.0) < w:
        problem = (
            f"the cluster has {have.get('GPU', 0.0):g} GPUs and training needs {w} "
            f"(train.num_workers={w}); lower train.num_workers or add GPU nodes"
        )
    elif have.get("CPU", 0.0) < need_cpu:
        problem = (
            f"the cluster has {have.get('CPU', 0.0):g} CPUs and training needs {need_cpu:g}: "
            f"{w} workers x {per_worker:g} (train.num_workers x train.cpus_per_worker) + {read:g} for a "
            f"read task (data.stream.read_task_cpus); lower those (e.g. train.cpus_per_worker="
            f"{max(0.25, (have.get('CPU', 0.0) - read) / max(w, 1)):.2g}) or add nodes, else the run "
            "waits forever for its data"
        )
    if problem and mode == "error":
        raise ValueError(problem)
    if problem:
        log.warning("%s (ray.resource_check=warn: going on, an autoscaler may add nodes)", problem)
    return problem


def resolve_vocab(
    cfg: ExperimentConfig, source: SomaCellSource, resume_from: Path | Store | None
) -> GeneVocab:
    """The vocabulary of a resumed checkpoint, a configured vocab.json, or one built from the data."""
    genes = source.gene_names()
    if resume_from is not None:
        vocab = read_vocab(resume_from)
    elif cfg.data.vocab_path:
        vocab = GeneVocab.load(cfg.data.vocab_path)
    else:
        return GeneVocab.from_genes(genes)
    known = sum(g in vocab for g in genes)
    if known == 0:
        raise ValueError(
            f"none of the {len(genes)} genes in {cfg.data.source.soma_uri} are in the vocabulary; "
            "pass the vocab.json that matches this data (data.vocab_path)"
        )
    if known < len(genes):
        log.warning(
            "%d of %d genes in the data are unknown to the vocabulary and are dropped",
            len(genes) - known,
            len(genes),
        )
    return vocab


def run_pretraining(cfg: ExperimentConfig) -> dict:
    """Pretrain (or resume) and consolidate; returns paths and final figures."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Workers and read tasks may run in another working directory (or on another node): absolute paths.
    cfg.output_dir = str(out)
    if "://" not in cfg.data.source.soma_uri:
        cfg.data.source.soma_uri = str(Path(cfg.data.source.soma_uri).resolve())
    if cfg.data.build_demo and not Path(cfg.data.source.soma_uri).exists():
        from data_ingest.demo_data import build_demo_experiment

        build_demo_experiment(cfg.data.source.soma_uri, synth_cells=cfg.data.demo_synth_cells)

    if cfg.train.storage_path and "://" not in cfg.train.storage_path:
        cfg.train.storage_path = str(Path(cfg.train.storage_path).resolve())
    # Checkpoints go to train.storage_path (local or object store) or output_dir; resolved once here and
    # handed to Ray Train and the workers with its filesystem (see scgpt_dist.storage).
    storage = resolve_storage(cfg.train.storage_path or out)
    resume_from = find_latest_checkpoint(storage)
    source = SomaCellSource(cfg.data.source)
    vocab = resolve_vocab(cfg, source, resume_from)
    resolved = source.resolve(vocab, TRAIN)
    replay_counts = None
    if cfg.data.replay.new_datasets is not None:  # re-pretraining: new cells + a replay sample
        from scgpt_dist.warmstart import replay_selection

        resolved, replay_counts = replay_selection(resolved, cfg.data.replay)
    if cfg.data.tokenizer.view_restyle:  # each batch's profile, for the restyled views
        resolved = attach_batch_profile(
            resolved, seed=cfg.data.tokenizer.seed, depth=cfg.data.tokenizer.view_restyle_depth
        )
    if cfg.model.use_batch_labels and cfg.model.n_batches == 0:
        cfg.model.n_batches = len(resolved.batch_categories)
    data_info = {
        "soma_uri": cfg.data.source.soma_uri,
        "census_version": cfg.data.source.census_version,
        "joinid_digest": joinid_digest(resolved.joinids),
        "layer": cfg.data.source.layer,
        "value_filter": cfg.data.source.value_filter,
        "n_train_cells": int(len(resolved.joinids)),
        "batch_categories": resolved.batch_categories,
        "label_categories": resolved.label_categories,
    }
    if replay_counts is not None:
        data_info["replay"] = replay_counts

    eval_set = None
    if cfg.eval.every > 0:
        from scgpt_dist.evaluate import prepare_eval_set

        eval_set = prepare_eval_set(cfg, source, vocab, cfg.train.num_workers)

    connected = init_ray(cfg)
    check_cluster_resources(cfg, local=not connected)
    uri = tracking_uri(cfg.mlflow.tracking_uri, out)
    run_id = start_or_resume_run(uri, cfg.mlflow.experiment, cfg.name, out)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if resume_from is None:
        params = flatten(to_dict(cfg))
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        client.log_text(run_id, dump_config(cfg), "config.yaml")
        log_lineage(
            client,
            run_id,
            cfg.data.source,
            data_info["joinid_digest"],
            data_info["n_train_cells"],
            len(vocab),
        )
    else:
        client.set_tag(run_id, "resumed_from", str(resume_from))

    stop_flag = StopFlag.remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "vocab": vocab.to_dict(),
            "tracking_uri": uri,
            "run_id": run_id,
            "data_info": data_info,
            "resolved": resolved,
            "storage": storage,
            "eval_set": eval_set,
            "stop_flag": stop_flag,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=storage.path,
            storage_filesystem=None if storage.is_local else storage.fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Checkpoints are ours alone (written, listed, pruned: scgpt_dist.checkpoint); Ray Train only
            # gets metrics, so its run snapshot never names a checkpoint that retention has deleted.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    t0 = time.perf_counter()
    clear_stall_reports(out / "workers")
    try:
        with SigtermRelay(stop_flag) as relay:
            result = trainer.fit()
    except Exception as err:
        client.set_terminated(run_id, status="FAILED")
        stalled = stall_reports(out / "workers")
        if stalled:  # say what was stuck, not only that a worker died
            # A rank waiting for data is a cause; ranks waiting for it in a barrier are its consequence.
            stalled.sort(key=lambda m: STALL_PHASES["data"] not in m)
            raise RuntimeError(" | ".join(stalled)) from err
        raise
    wall = time.perf_counter() - t0
    latest = find_latest_checkpoint(storage)
    if latest is None:
        client.set_terminated(run_id, status="FAILED")
        raise RuntimeError(
            f"training finished without a complete checkpoint under {storage / CHECKPOINTS_DIR}"
        )
    meta = read_meta(latest)
    # Metrics rank 0 could not write (MLflow was down at its last commit) are in the last checkpoint.
    MlflowCallback(uri, run_id, http_retries=None).replay(meta.get("pending_metrics", []))
    summary = {
        "run_id": run_id,
        "tracking_uri": uri,
        "checkpoint": str(latest),
        "step": meta["step"],
        "train_wall_s": wall,
        "n_train_cells": data_info["n_train_cells"],
        "result_metrics": result.metrics,
    }
    client.set_tag(run_id, "checkpoint", str(latest))
    preempted = bool((result.metrics or {}).get("preempted")) or relay.requested.is_set()
    if preempted and meta["step"] < cfg.train.max_steps:
        summary["preempted"] = True
        client.set_tag(run_id, "preempted_at_step", str(meta["step"]))
        client.set_terminated(run_id, status="KILLED")
        return summary
    if meta["step"] >= cfg.train.max_steps:
        model_dir = consolidate(latest, out / "model")
        client.log_artifacts(run_id, str(model_dir), "model")
        client.set_tag(run_id, "model_dir", str(model_dir))
        summary["model_dir"] = str(model_dir)
        if cfg.mlflow.registered_model:
            summary["model_version"] = register_model(
                client, cfg.mlflow.registered_model, run_id, data_info, meta
            )
        client.set_terminated(run_id, status="FINISHED")
    return summary


def _param(k, v):
    from mlflow.entities import Param

    return Param(k, str(v)[:6000])


def register_model(client, name: str, run_id: str, data_info: dict, meta: dict) -> str:
    """Register the run's consolidated model (artifact `model/`) as a new version of `name`, tagged with
    the data it was trained on."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered
    run = client.get_run(run_id)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run_id,
        tags={
            "data_version": str(data_info.get("census_version") or data_info["soma_uri"]),
            "soma_uri": data_info["soma_uri"],
            "train_cells": str(data_info["n_train_cells"]),
            "train_cells_digest": data_info["joinid_digest"],
            "step": str(meta["step"]),
            "vocab_fingerprint": meta["vocab_fingerprint"],
        },
    )
    return str(version.version)

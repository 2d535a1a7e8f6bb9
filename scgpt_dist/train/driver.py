"""Distributed pretraining on Ray Train + DeepSpeed: the driver.

`run_pretraining(cfg)` resolves the cells and the vocabulary, opens (or continues) the MLflow run, and launches
`train.loop.train_loop_per_worker` on `train.num_workers` Ray Train workers. Each worker streams its own share
of the cells with Ray Data (`data_ingest.stream.rank_batches`: deterministic per (seed, epoch, rank), so
resuming is exact).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray
import ray.train

from data_ingest.datasource import attach_batch_profile
from data_ingest.source import TRAIN, SomaCellSource
from data_ingest.vocab import GeneVocab
from scgpt_dist.config import ExperimentConfig, dump_config, flatten, to_dict
from scgpt_dist.train.callbacks import (
    MlflowCallback,
    saved_callback_state,
)
from scgpt_dist.train.checkpoint import (
    CHECKPOINTS_DIR,
    consolidate,
    find_latest_checkpoint,
    read_meta,
    read_vocab,
)
from scgpt_dist.train.lineage import joinid_digest, log_lineage
from scgpt_dist.train.loop import train_loop_per_worker
from scgpt_dist.train.preemption import (
    STALL_PHASES,
    SigtermRelay,
    StopFlag,
    clear_stall_reports,
    stall_reports,
)
from scgpt_dist.train.registry import register_candidate
from scgpt_dist.train.storage import Store
from scgpt_dist.train.storage import resolve as resolve_storage
from scgpt_dist.train.tracking import start_or_resume_run, tracking_uri

log = logging.getLogger(__name__)


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
    start_local_ray(num_cpus, cfg.ray.object_store_mb)
    return False


def start_local_ray(num_cpus: int, object_store_mb: int | None = None) -> None:
    """A single-node Ray instance on loopback, with the dashboard (the state API) on 127.0.0.1.

    Ray Train's placement-group cleaner asks the state API every few seconds whether the train controller is
    alive; without a dashboard every query fails and it logs a warning each time, for the whole run. On one
    node there is no node to drain, so Ray Train's preemption watcher (an actor per worker group that polls
    for node drains) is switched off; on a real cluster (`ray.address`, `ray job submit`) it stays on."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
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
    # handed to Ray Train and the workers with its filesystem (see scgpt_dist.train.storage).
    storage = resolve_storage(cfg.train.storage_path or out)
    resume_from = find_latest_checkpoint(storage)
    source = SomaCellSource(cfg.data.source)
    vocab = resolve_vocab(cfg, source, resume_from)
    resolved = source.resolve(vocab, TRAIN)
    replay_counts = None
    if cfg.data.replay.new_datasets is not None:  # re-pretraining: new cells + a replay sample
        from scgpt_dist.train.warmstart import replay_selection

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
            # Checkpoints are ours alone (written, listed, pruned: scgpt_dist.train.checkpoint); Ray Train only
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
    mlflow_state = saved_callback_state(meta).get(MlflowCallback.name, {})
    MlflowCallback(uri, run_id, http_retries=None).load_state_dict(mlflow_state)
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
            version = register_candidate(
                client, cfg.mlflow.registered_model, run_id, model_version_tags(data_info, meta)
            )
            summary["model_version"] = str(version.version)
        client.set_terminated(run_id, status="FINISHED")
    return summary


def _param(k, v):
    from mlflow.entities import Param

    return Param(k, str(v)[:6000])


def model_version_tags(data_info: dict, meta: dict) -> dict[str, str]:
    """The tags a registered model version of a pretraining run carries: the data it was trained on."""
    return {
        "data_version": str(data_info.get("census_version") or data_info["soma_uri"]),
        "soma_uri": data_info["soma_uri"],
        "train_cells": str(data_info["n_train_cells"]),
        "train_cells_digest": data_info["joinid_digest"],
        "step": str(meta["step"]),
        "vocab_fingerprint": meta["vocab_fingerprint"],
    }

"""Training callbacks: MLflow logging (rank 0 only) and checkpointing through Ray Train."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import ray.train

from data_ingest import keys
from data_ingest.vocab import GeneVocab, write_text_atomic
from scgpt_dist import __version__
from scgpt_dist.checkpoint import step_dir_name
from scgpt_dist.config import ExperimentConfig, dump_config


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class MlflowCallback:
    """Logs metrics to the job's MLflow run. Constructed on rank 0 only; other ranks never write."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


class CheckpointCallback:
    """Every rank saves its DeepSpeed shard to a local temp dir; rank 0 adds config, vocab and meta; then
    `ray.train.report` merges all ranks' files into `checkpoints/step_<N>` in the run's storage."""

    def __init__(
        self, cfg: ExperimentConfig, vocab: GeneVocab, rank: int, world_size: int, data_info: dict
    ):
        self.cfg = cfg
        self.vocab = vocab
        self.rank = rank
        self.world_size = world_size
        self.data_info = data_info

    def due(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_every == 0

    def save(self, module, state: dict, metrics: dict[str, float]) -> None:
        tmp = tempfile.mkdtemp(prefix=f"scgpt-ckpt-r{self.rank}-")
        try:
            module.save(tmp, client_state={"train_state": dict(state)})
            if self.rank == 0:
                write_text_atomic(Path(tmp) / keys.CONFIG_FILE, dump_config(self.cfg))
                self.vocab.save(Path(tmp) / keys.VOCAB_FILE)
                meta = {
                    **state,
                    "world_size": self.world_size,
                    "zero_stage": self.cfg.train.zero_stage,
                    "data": self.data_info,
                    "vocab_fingerprint": self.vocab.fingerprint(),
                    "package_version": __version__,
                    "git_sha": git_sha(),
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                # meta.json is the completion marker: written last, after the shards.
                write_text_atomic(Path(tmp) / keys.META_FILE, json.dumps(meta, indent=1))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=step_dir_name(state["step"]),
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def local_rank_env() -> dict[str, str]:
    return {k: os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

"""What the training loop calls besides the model: the callback protocol and its callbacks (MLflow, the
progress line, system metrics) and the checkpointer.

**Callbacks** (`Callback`) observe the loop: it calls each hook on every callback of its `CallbackList`, in
list order: `on_log` (a logging window's metrics), `on_eval` (an evaluation's), `on_checkpoint` (a committed
checkpoint), `on_train_end`. A callback that must survive a restart keeps its own state: `state_dict()` is
stored in every checkpoint's meta.json (`callbacks.<name>`) and handed back to `load_state_dict` when the
run resumes (`{}` on a fresh start). The MLflow callback stores its unwritten metrics that way. Callbacks
that only act on rank 0 are only built there.

The **checkpointer** and the evaluator (`train/evaluator.py`) are collectives (every rank takes part at the
same steps), so the loop calls them itself and hands their results to the callbacks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray.train

from data_ingest import keys
from data_ingest.vocab import GeneVocab, write_text_atomic
from scgpt_dist import __version__
from scgpt_dist.config import ExperimentConfig, dump_config
from scgpt_dist.train.checkpoint import (
    CHECKPOINTS_DIR,
    step_dir_name,
    validate_checkpoint,
    write_manifest,
)
from scgpt_dist.train.lineage import git_info
from scgpt_dist.train.storage import Store, upload_dir

log = logging.getLogger(__name__)


class Callback:
    """Hooks the training loop calls (all optional); see the module docstring."""

    name = "callback"
    """Key of this callback's state in a checkpoint's meta.json."""

    def state_dict(self) -> dict:
        """What this callback needs after a restart (JSON-able; empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Called once before training with the state saved in the checkpoint resumed from ({} if none)."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """A logging window's metrics (loss, rates, counters), summed over ranks."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An in-training evaluation's metrics (`eval/*`)."""

    def on_checkpoint(self, step: int, path: str) -> None:
        """The checkpoint at `step` is committed (complete in storage) at `path`."""

    def on_train_end(self, step: int) -> None:
        """Training stops (finished, preempted or failed)."""


class CallbackList:
    """The loop's callbacks, called in order; their states keyed by name."""

    def __init__(self, callbacks: list[Callback]):
        names = [cb.name for cb in callbacks]
        if len(set(names)) != len(names):
            raise ValueError(f"callback names must be unique, got {names}")
        self.callbacks = list(callbacks)

    def state_dict(self) -> dict[str, dict]:
        return {cb.name: state for cb in self.callbacks if (state := cb.state_dict())}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        for cb in self.callbacks:
            cb.load_state_dict(states.get(cb.name, {}))

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_eval(step, metrics)

    def on_checkpoint(self, step: int, path: str) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(step, path)

    def on_train_end(self, step: int) -> None:
        for cb in self.callbacks:
            cb.on_train_end(step)


def saved_callback_state(meta: dict) -> dict[str, dict]:
    """The callbacks' states stored in a checkpoint's meta.json (checkpoints written before the callback
    protocol kept the MLflow buffer as `pending_metrics`)."""
    if "callbacks" in meta:
        return dict(meta["callbacks"])
    return {MlflowCallback.name: {"pending_metrics": meta.get("pending_metrics", [])}}


class MlflowCallback(Callback):
    """Logs the job's metrics to its MLflow run. Constructed on rank 0 only; other ranks never write.

    Metrics are buffered and written when the checkpoint covering their steps is committed; the buffer is
    also stored in that checkpoint's meta.json. After a failure the run resumes from the newest complete
    checkpoint, first writes whatever of its stored metrics MLflow does not have yet (the process may have
    died between the checkpoint and the MLflow write), then recomputes the later steps. So the MLflow curve
    has each step exactly once, with no gap.

    An unreachable tracking server never stops training: a write that fails keeps its metrics (and tags)
    buffered, logs one warning for the outage, and they are written by the first commit after the server
    is back (one more line says so). Until then each checkpoint carries them in meta.json, so a resume
    replays them too. Each HTTP request gets `http_retries` quick retries and a `http_timeout_s` timeout
    (MLflow's own defaults retry for minutes, which would stall every rank at the next collective).
    """

    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        http_retries: int | None = 2,
        http_timeout_s: int = 10,
    ):
        from mlflow.tracking import MlflowClient

        if http_retries is not None:  # None (the driver): MLflow's own patient defaults
            # Read by MLflow at each request; in a training worker rank 0 is MLflow's only user.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(http_retries))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(http_timeout_s))
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._pending: list = []
        self._tags: dict[str, str] = {}
        self._replay_rows: list[list] = []
        self._resync = False
        self._logged_through = -1
        """The last step MLflow had when this worker started: a rerun of steps up to it (a resume from an
        older checkpoint than the newest, e.g. when the newest was damaged) logs nothing twice."""
        self._down_since: float | None = None
        """When a write first failed in the current outage (None: the last write succeeded)."""

    def state_dict(self) -> dict:
        return {"pending_metrics": self.pending()}

    def load_state_dict(self, state: dict) -> None:
        self.replay(state.get("pending_metrics", []))

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.log(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.log(step, metrics)

    def on_checkpoint(self, step: int, path: str) -> None:
        self.commit({"checkpoint.latest": path, "step": step})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [
            Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None
        ]

    def pending(self) -> list[list]:
        """Buffered metrics as JSON-able rows `[key, value, timestamp_ms, step]` (rows a replay could not
        write yet first)."""
        return self._replay_rows + [[m.key, m.value, m.timestamp, m.step] for m in self._pending]

    def replay(self, rows: list[list]) -> None:
        """Write the stored rows whose step MLflow has not seen yet (after a resume). When the server is
        unreachable they are kept and replayed by the next commit."""
        self._replay_rows = list(rows)
        self._resync = True
        self._write()

    def commit(self, tags: dict[str, str] | None = None) -> bool:
        """Write buffered metrics (and tags): their steps are now covered by a committed checkpoint.
        Returns False (and keeps them buffered) when the tracking server cannot be reached."""
        self._tags.update({k: str(v) for k, v in (tags or {}).items()})
        return self._write()

    def _write(self) -> bool:
        from mlflow.entities import Metric, RunTag

        try:
            if self._resync:
                logged = self.client.get_metric_history(self.run_id, "loss")
                last = max((m.step for m in logged), default=-1)
                rows = [r for r in self._replay_rows if int(r[3]) > last]
                steps = [int(r[3]) for r in rows if r[0] == "loss"]
                self._logged_through = max([self._logged_through, last, *steps])
                missing = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in rows]
                while missing:
                    self.client.log_batch(self.run_id, metrics=missing[:900])
                    missing = missing[900:]
                self._replay_rows, self._resync = [], False
            self._pending = [m for m in self._pending if m.step > self._logged_through]
            # MLflow caps a batch at 1000 entries; each chunk leaves the buffer once written.
            while self._pending:
                self.client.log_batch(self.run_id, metrics=self._pending[:900])
                self._pending = self._pending[900:]
            if self._tags:
                self.client.log_batch(
                    self.run_id, tags=[RunTag(k, v) for k, v in self._tags.items()]
                )
                self._tags = {}
        except Exception as exc:  # any failure to reach the server; training goes on
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning(
                    "MLflow at %s is not reachable (%s: %s); training goes on and its metrics are "
                    "kept (also in each checkpoint) until the server is back",
                    self.tracking_uri,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
            return False
        if self._down_since is not None:
            log.warning(
                "MLflow is reachable again after %.0f s; the buffered metrics are written",
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        return True


class Checkpointer:
    """Every rank saves its DeepSpeed shard to a local temp dir (rank 0 adds config, vocab and meta) and
    uploads it to `checkpoints/step_<N>` in the run's storage itself (`storage`: `train.storage_path` or the
    output directory; a local path or an object-store URI, through `scgpt_dist.train.storage`).

    Ray Train is told the metrics, never the checkpoint: our manifests are the one record of which
    checkpoints exist and are complete. (Reporting them made Ray Train list every checkpoint in its run
    snapshot; once our retention deleted one, a restarted driver refused to start.)"""

    def __init__(
        self,
        cfg: ExperimentConfig,
        vocab: GeneVocab,
        rank: int,
        world_size: int,
        data_info: dict,
        storage: Store,
    ):
        self.storage = storage
        self.cfg = cfg
        self.vocab = vocab
        self.rank = rank
        self.world_size = world_size
        self.data_info = data_info
        self.git_commit = git_info().get("commit")  # once, not a `git` call per checkpoint

    def due(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_every == 0

    def save(
        self, module, state: dict, metrics: dict[str, float], callbacks: dict | None = None
    ) -> str:
        """Write and report the checkpoint (a collective: every rank calls it at the same step); returns
        the committed checkpoint's path.

        A directory left at this step by an interrupted attempt is removed first. Each rank uploads its
        files, its manifest last (rank 0's meta.json just before it); all ranks meet, and rank 0 checks the
        checkpoint is complete in storage before returning: only then may the caller commit anything that
        depends on it (the MLflow metrics it covers). `callbacks` is the callbacks' state (rank 0's). A rank killed mid-upload makes this raise, the worker
        group restarts from the previous complete checkpoint, and those steps are logged once, by the
        rerun."""
        nodes = _gather_node_ids()
        name = step_dir_name(state["step"])
        target = self.storage / CHECKPOINTS_DIR / name
        if self.rank == 0:
            target.delete()
        _barrier()
        tmp = tempfile.mkdtemp(prefix=f"scgpt-ckpt-r{self.rank}-")
        try:
            module.save(tmp, client_state={"train_state": dict(state)})
            if self.rank == 0:
                write_text_atomic(Path(tmp) / keys.CONFIG_FILE, dump_config(self.cfg))
                self.vocab.save(Path(tmp) / keys.VOCAB_FILE)
                meta = {
                    **state,
                    "world_size": self.world_size,
                    "worker_nodes": nodes,
                    "zero_stage": self.cfg.train.zero_stage,
                    "loss": metrics.get("loss"),
                    "node_drain": bool(metrics.get("node_drain")),  # written because a node drains
                    "data": self.data_info,
                    "vocab_fingerprint": self.vocab.fingerprint(),
                    "callbacks": callbacks or {},
                    "package_version": __version__,
                    "git_sha": self.git_commit,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                # meta.json is the completion marker: written last, after the shards.
                write_text_atomic(Path(tmp) / keys.META_FILE, json.dumps(meta, indent=1))
            manifest = write_manifest(tmp, self.rank)  # marks this rank's files complete
            upload_dir(tmp, target, last=(keys.META_FILE, manifest.name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        if self.rank == 0:  # raises CheckpointError if a rank's files are missing
            validate_checkpoint(target, verify_checksums=False)
        ray.train.report({"step": state["step"], **metrics})
        return target.uri


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather_node_ids() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective)."""
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def write_worker_info(output_dir: str, rank: int) -> None:
    """`workers/rank_<r>.json`: pid, host and Ray node of each rank, for operators (and failure tests)."""
    import socket

    info = {
        "rank": rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(Path(output_dir) / "workers" / f"rank_{rank}.json", json.dumps(info))


def _console(line: str) -> None:
    """One line on the process's real stdout. Ray Train patches `print` in its workers to log through the
    root logger and, when something has wrapped `sys.stdout`, to also print: every line twice. Writing to
    `sys.__stdout__` directly reaches the driver's console (and `ray job logs`) once."""
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class ProgressCallback(Callback):
    """A compact console line on rank 0 at log points, at most every `train.progress_every_s` seconds:

        step 300/1500 (20%) | loss 24.1 (gep 19.6, gepc 4.5) | lr 3.0e-03 | 9.8k tok/s | data wait 2% | 1m04s, ETA 4m16s

    Printed (not logged) so it reaches the driver's console, and `ray job logs`, from the Ray Train worker;
    one more line per evaluation."""

    name = "progress"

    def __init__(self, total_steps: int, start_step: int, every_s: float):
        self.total = total_steps
        self.start_step = start_step
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last = -float("inf")

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.update(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.evaluation(step, metrics)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if now - self._last < self.every_s and step < self.total:
            return
        self._last = now
        elapsed = now - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = ", ".join(
            f"{k[len('loss_') :]} {v:.4g}"
            for k, v in sorted(metrics.items())
            if k.startswith("loss_")
        )
        _console(
            f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"
            f" | loss {metrics['loss']:.4g}"
            + (f" ({parts})" if parts else "")
            + f" | lr {metrics['lr']:.1e} | {metrics['tokens_per_s'] / 1e3:.1f}k tok/s"
            f" | data wait {100 * metrics['data_wait_fraction']:.0f}%"
            f" | {_duration(elapsed)}" + (f", ETA {_duration(eta)}" if done > 0 else "")
        )

    @staticmethod
    def evaluation(step: int, metrics: dict[str, float]) -> None:
        """One line per in-training evaluation: held-out GEP against its baselines, embedding scores."""
        base = ", ".join(
            f"{k[len('eval/baseline_') :]} {v:.4g}"
            for k, v in metrics.items()
            if k.startswith("eval/baseline_")
        )
        line = f"eval step {step} | held-out GEP {metrics['eval/gep_mse']:.4g}"
        if base:
            line += f" (baselines: {base})"
        for key, name in (("eval/knn_type", "kNN type"), ("eval/knn_batch", "kNN batch")):
            if key in metrics:
                line += f" | {name} {metrics[key]:.3f}"
        if "eval/mean_cosine" in metrics:
            line += f" | mean cosine {metrics['eval/mean_cosine']:.3f}"
        _console(line)


class SystemMetricsCallback(Callback):
    """MLflow's system metrics (CPU, memory, GPU) sampled into the run while training (`mlflow.system_metrics`)."""

    name = "system_metrics"

    def __init__(self, tracking_uri: str, run_id: str, sampling_interval_s: int = 10):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=sampling_interval_s,
            resume_logging=True,
            tracking_uri=tracking_uri,
        )
        self.monitor.start()

    def on_train_end(self, step: int) -> None:
        self.monitor.finish()

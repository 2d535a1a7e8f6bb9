"""The training loop on every Ray Train worker: counters, the step loop over the rank's stream, logging
windows, evaluation, checkpoints and stop requests. `TrainModule` (train/module.py) owns the model and the
step; the evaluator (train/evaluator.py) and the checkpointer (train/callbacks.py) are collectives the loop
calls itself, and the callbacks (`CallbackList`: MLflow, the progress line, system metrics) hear about logs,
evaluations and checkpoints in order."""

from __future__ import annotations

import contextlib
import json
import logging
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

from data_ingest.keys import BATCH, CELL_ID, GENES, LABEL, MODALITY, PAD_VALUE, VALUES
from data_ingest.stream import StreamStats, prestart_readers, rank_batches
from data_ingest.tokenize import RECORD_SCHEMA, VIEW_COLUMNS, mix64
from data_ingest.vocab import GeneVocab
from scgpt_dist.config import ExperimentConfig, from_dict
from scgpt_dist.model.collate import collate
from scgpt_dist.train.callbacks import (
    CallbackList,
    Checkpointer,
    MlflowCallback,
    ProgressCallback,
    SystemMetricsCallback,
    saved_callback_state,
    write_worker_info,
)
from scgpt_dist.train.checkpoint import (
    find_latest_checkpoint,
    open_checkpoint,
    prune_checkpoints,
)
from scgpt_dist.train.evaluator import Evaluator
from scgpt_dist.train.preemption import (
    StallWatchdog,
    StopWatcher,
)
from scgpt_dist.train.storage import Store

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
    from scgpt_dist.train.module import TrainModule  # DeepSpeed: imported in the workers only

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
    if cfg.data.stream.prestart:  # the read workers start and warm up while the model is built
        loop_config = {
            **loop_config,
            "prestart": prestart_readers(
                loop_config["resolved"], cfg.data.tokenizer, vocab.cls_id, cfg.data.stream
            ),
        }

    module = TrainModule(cfg, vocab, world, rank)
    state = TrainState()
    saved: dict = {}
    with _resume_dir(loop_config["storage"]) as resume:
        if resume is not None:
            state.load_state_dict(module.load(str(resume))["train_state"])
            saved = saved_callback_state(_meta(resume))
            log.info("rank %d resumed from %s at step %d", rank, resume, state.step)
        elif cfg.train.init_from:
            from scgpt_dist.train.warmstart import load_into_engine

            load_into_engine(module.engine, cfg.train.init_from)  # a collective under ZeRO-3
            log.info("rank %d warm-started from %s", rank, cfg.train.init_from)

    callbacks = CallbackList([])
    if rank == 0:  # the callbacks only act on rank 0: MLflow's one writer, the one console line
        uri, run_id = loop_config["tracking_uri"], loop_config["run_id"]
        callbacks = CallbackList(
            [
                MlflowCallback(uri, run_id),
                ProgressCallback(_stop_step(cfg), state.step, cfg.train.progress_every_s),
            ]
            + ([SystemMetricsCallback(uri, run_id)] if cfg.mlflow.system_metrics else [])
        )
    callbacks.load_state_dict(saved)
    try:
        _train(cfg, vocab, module, state, callbacks, rank, world, loop_config)
    finally:
        callbacks.on_train_end(state.step)


def _stop_step(cfg: ExperimentConfig) -> int:
    return min(cfg.train.max_steps, cfg.train.stop_after_steps or cfg.train.max_steps)


def _train(cfg, vocab, module, state, callbacks, rank, world, loop_config) -> None:
    """The step loop, watched for stalls (`train.stall_timeout_s`)."""
    watchdog = StallWatchdog(cfg.train.stall_timeout_s, rank, str(Path(cfg.output_dir) / "workers"))
    watchdog.start()
    try:
        _loop(cfg, vocab, module, state, callbacks, rank, world, loop_config, watchdog)
    finally:
        watchdog.stop()


def _loop(cfg, vocab, module, state, callbacks, rank, world, loop_config, watchdog) -> None:
    """data -> micro-steps -> counters, logging and checkpoints; stops early on a stop request."""
    storage: Store = loop_config["storage"]
    checkpointer = Checkpointer(cfg, vocab, rank, world, loop_config["data_info"], storage)
    stop_at = _stop_step(cfg)
    resolved = loop_config["resolved"]
    stats = StreamStats()
    win = _Window()
    stopper = StopWatcher(
        loop_config.get("stop_flag"), rank, cfg.train.stop_poll_s, cfg.train.on_node_drain
    )
    evaluator = None
    if loop_config.get("eval_set") is not None:
        evaluator = Evaluator(cfg, loop_config["eval_set"], rank, world, vocab.pad_id)
        if state.step == 0:  # the model at initialisation: what training has to beat
            watchdog.beat("eval", state.step)
            _evaluate(evaluator, module, 0, callbacks)

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
            warm=loop_config.pop("prestart", None),  # the first epoch's
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
                save = checkpointer.due(state.step) or state.step == stop_at or action is not None
                if preempted and rank == 0:
                    log.warning("stopping after step %d (%s)", state.step, stopper.reason)
                elif action == "checkpoint" and rank == 0:
                    log.warning(
                        "%s: checkpoint at step %d, training goes on; when the node goes, Ray Train "
                        "restarts the workers and they resume from it",
                        stopper.reason,
                        state.step,
                    )
                if evaluator is not None and not preempted and evaluator.due(state.step, stop_at):
                    watchdog.beat("eval", state.step)
                    _evaluate(evaluator, module, state.step, callbacks)
                if save or state.step % cfg.train.log_every == 0:
                    window_loss = _flush_window(cfg, state, win, module, callbacks, rank, world)
                    stats.skipped_cells = 0
                    win = _Window()
                if save:
                    watchdog.beat("checkpoint", state.step)
                    path = checkpointer.save(
                        module,
                        state.state_dict(),
                        {
                            "step": state.step,
                            "loss": window_loss,
                            "preempted": int(preempted),
                            "node_drain": int(action == "checkpoint"),
                        },
                        callbacks.state_dict(),
                    )
                    callbacks.on_checkpoint(state.step, path)
                    if rank == 0:
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


def _evaluate(evaluator: Evaluator, module, step: int, callbacks: CallbackList) -> None:
    metrics = evaluator.run(module.engine.module, step)  # a collective; metrics on rank 0
    if metrics is not None:
        callbacks.on_eval(step, metrics)


def _flush_window(
    cfg, state: TrainState, win: _Window, module, callbacks: CallbackList, rank: int, world: int
) -> float:
    """Sum the window's counters over ranks (a collective: every rank calls it at the same steps), add them
    to the global counters, and on rank 0 hand the window's metrics to the callbacks. Returns the window's
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
    if rank != 0:
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
    callbacks.on_log(state.step, metrics)
    return metrics["loss"]


# ------------------------------------------------------------------------------------------------ driver

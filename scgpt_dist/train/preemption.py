"""Stopping or saving a run on purpose: preemption (SIGTERM to the job, a spot reclaim, a Kubernetes eviction)
or a Ray node drain.

- SIGTERM to the job's entry point (what `ray job stop`, `kill`, a pod's termination send): the driver's
  handler sets a `StopFlag` actor; the workers finish the step they are in, write a checkpoint, and the job
  exits with `EXIT_PREEMPTED`; submitting the same command again continues at that step and data position.
- A node that holds a rank starts draining (autoscaler scale-down, a cloud's spot notice, KubeRay): Ray
  Train's preemption watcher tells the workers (`ray.train.get_preemption_info()`). With
  `train.on_node_drain: checkpoint` (the default) the workers write a checkpoint after the current step and
  train on; when the node goes, Ray Train restarts the worker group on what is left (counted against its
  preemption budget, not `train.max_failures`) and every rank resumes from that checkpoint. With `stop`
  they checkpoint and the job exits as on SIGTERM.
Every rank polls both at most every `train.stop_poll_s` seconds and the ranks agree with one all-reduce per
step, so they all act after the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a run that stopped early on a preemption signal after writing its checkpoint (EX_TEMPFAIL:
try again). Resubmit the same command to continue."""


@ray.remote(num_cpus=0)
class StopFlag:
    """Set once by the driver; read by rank 0."""

    def __init__(self):
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> str | None:
        return self.reason


class SigtermRelay:
    """On the driver: while active, SIGTERM sets the `StopFlag` (from a thread: a signal handler only sets
    an event) instead of ending the process."""

    def __init__(self, flag):
        self.flag = flag
        self.requested = threading.Event()
        self._previous = None
        self._thread = threading.Thread(target=self._relay, daemon=True, name="sigterm-relay")

    def __enter__(self) -> SigtermRelay:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested.set()

    def _relay(self) -> None:
        self.requested.wait()
        log.warning(
            "SIGTERM: the workers finish this step, write a checkpoint and stop; the job then exits "
            "with %d (run the same command again to continue)",
            EXIT_PREEMPTED,
        )
        self.flag.set.remote("SIGTERM")


class StopWatcher:
    """On every rank: `poll()` is a collective that says what to do after this step: `"stop"` (checkpoint
    and end the run), `"checkpoint"` (checkpoint and train on) or None.

    Rank 0 keeps the clock: every `poll_s` it reads the `StopFlag`, and the ranks learn through one small
    all-reduce per step both its answer and whether to ask Ray Train for preemption info now
    (`get_preemption_info` is itself a collective, so every rank must call it at the same step). A drain
    acts once per set of draining nodes: the info stays set until the worker group is restarted."""

    def __init__(self, flag, rank: int, poll_s: float, on_drain: str = "checkpoint"):
        self.flag = flag
        self.rank = rank
        self.poll_s = poll_s
        self.on_drain = on_drain
        self.reason: str | None = None
        self._drained: set[str] = set()
        self._last = -float("inf")

    def _flag_reason(self) -> str | None:
        if self.flag is None:
            return None
        try:
            return ray.get(self.flag.get.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return None  # the driver is gone or slow: Ray Train ends the workers itself then

    def poll(self) -> str | None:
        due = self.rank == 0 and time.monotonic() - self._last >= self.poll_s
        flagged = None
        if due:
            self._last = time.monotonic()
            flagged = self._flag_reason()
        votes = torch.tensor([1.0 if flagged else 0.0, 1.0 if due else 0.0])
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        if votes[0] > 0:
            self.reason = flagged or "SIGTERM"
            return "stop"
        if votes[1] == 0 or not distributed:
            return None
        info = self._preemption_info()
        if info is None or not set(info.preempted_node_ids) - self._drained:
            return None
        nodes = set(info.preempted_node_ids)
        self._drained |= nodes
        left = ""
        if info.deadline_ms:
            left = f", {info.deadline_ms / 1000 - time.time():.0f} s before its deadline"
        self.reason = (
            f"node drain: {', '.join(sorted(n[:12] for n in nodes))} (ranks "
            f"{sorted(info.preempted_ranks)}{left})"
        )
        return "stop" if self.on_drain == "stop" else "checkpoint"

    @staticmethod
    def _preemption_info():
        """Ray Train's preemption info (a collective across the ranks); None outside Ray Train."""
        try:
            return ray.train.get_preemption_info()
        except (AttributeError, RuntimeError):
            return None


EXIT_STALLED = 76
"""Exit code of a worker process that the stall watchdog ended."""

STALL_PHASES = {
    "data": (
        "waiting for the next batch from the data stream: its read tasks may not be getting CPUs (the "
        "workers hold train.num_workers x train.cpus_per_worker; each read task needs "
        "data.stream.read_task_cpus) or the SOMA source is not answering"
    ),
    "step": (
        "inside a training step (forward, backward, optimizer, collectives): another rank may have died "
        "or stopped, so this one waits in a collective"
    ),
    "checkpoint": (
        "writing a checkpoint: the storage (train.storage_path) may not be answering, or another rank is "
        "stuck before the checkpoint's barrier (see its own line)"
    ),
    "eval": "in the in-training evaluation (eval.every)",
}


class StallWatchdog:
    """On every rank: if the loop makes no progress for `timeout_s` in one phase, say what is stuck (one line
    on the console and in `workers/stall_rank_<r>.txt`) and end this worker process with `EXIT_STALLED`, so
    the run fails (or, with `train.max_failures`, restarts from its last checkpoint) instead of waiting
    forever."""

    def __init__(self, timeout_s: float, rank: int, report_dir: str | None):
        self.timeout_s = timeout_s
        self.rank = rank
        self.report_dir = report_dir
        self.phase = "data"
        self.step = 0
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="stall-watchdog")

    def start(self) -> StallWatchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self, phase: str, step: int) -> None:
        self.phase, self.step, self._beat = phase, step, time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(10.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._beat
            if idle < self.timeout_s:
                continue
            message = (
                f"stalled: rank {self.rank} made no progress for {idle:.0f} s after step {self.step}, "
                f"{STALL_PHASES.get(self.phase, self.phase)} (train.stall_timeout_s={self.timeout_s:g})"
            )
            print(f"ERROR {message}", file=sys.__stderr__ or sys.stderr, flush=True)
            if self.report_dir:
                path = Path(self.report_dir) / f"stall_rank_{self.rank}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(message + "\n")
            os._exit(EXIT_STALLED)


def stall_reports(report_dir) -> list[str]:
    """The watchdog's messages left by the ranks of the last attempt (read by the driver after a failure)."""
    return [p.read_text().strip() for p in sorted(Path(report_dir).glob("stall_rank_*.txt"))]


def clear_stall_reports(report_dir) -> None:
    for p in Path(report_dir).glob("stall_rank_*.txt"):
        p.unlink(missing_ok=True)

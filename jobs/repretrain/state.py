"""The re-pretraining job's exit codes, directory layout and per-run state file (`repretrain_state.json`,
written atomically after every step so an interrupted run continues where it stopped)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from data_ingest.atomic import write_text_atomic

log = logging.getLogger("jobs.repretrain")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 3
EXIT_CONFLICT = 4

STATE_FILE = "repretrain_state.json"
RUNS_DIR = "runs"
PROMOTED_DIR = "promoted"
INIT_DIR = "init"
TRAIN_DIR = "train"

# Steps, in order; the state file holds the last one completed.
PLANNED = "planned"
TRAINED = "trained"
EVALUATED = "evaluated"
REJECTED = "rejected"
REGISTERED = "registered"
PROMOTED = "promoted"


@dataclass
class RunState:
    """One re-pretraining attempt: from a base version to a data version."""

    step: str
    target: dict
    """The DataVersion trained on (registry.DataVersion as a dict)."""
    base_version: str | None
    """The promoted version this run started from (None: the first version)."""
    new_datasets: list[str] | None
    run_id: str | None = None
    model_dir: str | None = None
    metrics: dict | None = None
    gate: dict | None = None
    candidate_version: str | None = None
    history: list[list[str]] = field(default_factory=list)
    """(step, UTC time) of every step completed, including repeats after a restart."""

    @classmethod
    def load(cls, path: Path) -> RunState | None:
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def advance(self, step: str, path: Path) -> None:

        self.step = step
        self.history.append([step, dt.datetime.now(dt.UTC).isoformat(timespec="seconds")])
        write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=1))
        log.info("repretrain step %s (state: %s)", step, path)


@dataclass
class Outcome:
    code: int
    message: str
    state: RunState | None = None
    run_dir: Path | None = None

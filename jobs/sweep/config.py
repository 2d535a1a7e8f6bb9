"""A sweep's settings: the job every cell runs (`JobSpec`), the grid and concurrency (`SweepConfig`), and the
cells a grid expands to (each with a stable key)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scgpt_dist.config import ConfigError, MlflowConfig, apply_overrides, from_dict

log = logging.getLogger(__name__)


JOB_KINDS = ("pretrain", "finetune", "callable")
CELLS_DIR = "cells"
DONE_FILE = "done.json"
REPORT_DIR = "report"
CSV_FILE = "results.csv"
SWEEP_EXPERIMENT = "scgpt-dist-sweeps"


@dataclass
class JobSpec:
    """What every cell runs; the cell's parameters are added to it."""

    kind: str = "pretrain"
    """`pretrain`, `finetune` or `callable`."""
    config: str | None = None
    """pretrain: the experiment YAML (e.g. jobs/configs/tiny.yaml)."""
    overrides: list[str] = field(default_factory=list)
    """pretrain: `key.sub=value` overrides shared by all cells."""
    task: str | None = None
    """finetune: the task name (`python -m jobs.finetune --help` lists them)."""
    args: list[str] = field(default_factory=list)
    """finetune: arguments shared by all cells (e.g. [--checkpoint, DIR, --data, pbmc68k_reduced])."""
    function: str | None = None
    """callable: `package.module:function`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """callable: keyword arguments shared by all cells."""

    def __post_init__(self) -> None:
        if self.kind not in JOB_KINDS:
            raise ValueError(f"job.kind={self.kind!r}; choose one of {JOB_KINDS}")
        need = {"pretrain": "config", "finetune": "task", "callable": "function"}[self.kind]
        if not getattr(self, need):
            raise ValueError(f"job.kind={self.kind!r} needs job.{need}")
        if self.kind == "callable" and ":" not in self.function:
            raise ValueError(
                f"job.function={self.function!r} must look like package.module:function"
            )
        reserved = {"--out", "--parent-run-id", "--tracking-uri", "--experiment", "--in-process"}
        clash = reserved.intersection(self.args)
        if clash:
            raise ValueError(
                f"job.args sets {sorted(clash)}; the sweep sets those per cell, drop them"
            )


@dataclass
class SweepConfig:
    """A job, a parameter grid, and how many cells run at once."""

    name: str = "sweep"
    output_dir: str = "outputs/sweep"
    """Cells (`cells/<key>/`), the report (`report/`) and, by default, the MLflow store go here."""
    job: JobSpec = field(default_factory=JobSpec)
    grid: dict[str, Any] = field(default_factory=dict)
    """Parameter -> list of values; the sweep runs every combination. Keys are config keys (`train.lr`) for
    pretrain jobs, flag names without `--` (`lr`) for finetune jobs, keyword names for callables."""
    cells: list[dict[str, Any]] = field(default_factory=list)
    """Extra cells (parameter dicts) run next to the grid's combinations."""
    concurrency: int = 1
    """Cells running at the same time (Ray tasks in flight)."""
    num_cpus: float = 1.0
    """CPUs each cell's Ray task reserves. A pretrain cell's Ray Train workers reserve their own CPUs; give
    its task 0 so the task itself does not hold a CPU the workers need (on a 2-core machine this is what
    lets a nested TorchTrainer start at all)."""
    num_gpus: float = 0.0
    """GPUs each cell's Ray task reserves (finetune tasks on GPU nodes)."""
    metrics: list[str] = field(default_factory=list)
    """Result columns of the comparison table, in order; empty = every numeric result."""
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment=SWEEP_EXPERIMENT))
    """Where the parent run and every child run go (`registered_model` is the cells' business: see
    `job.config`)."""
    ray_address: str | None = None
    """Ray cluster address; None uses $RAY_ADDRESS or starts a local Ray instance."""

    def __post_init__(self) -> None:
        if not isinstance(self.grid, dict):
            raise ValueError(f"grid must map parameter -> list of values, got {self.grid!r}")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(
                    f"grid.{key} must be a non-empty list of values, got {values!r} "
                    f"(write `{key}: [{values!r}]` for a single value)"
                )
        for i, cell in enumerate(self.cells):
            if not isinstance(cell, dict) or not cell:
                raise ValueError(f"cells[{i}] must be a non-empty mapping, got {cell!r}")
        if not self.grid and not self.cells:
            raise ValueError("the sweep has no cells: give a grid and/or cells")
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency}; use >= 1")
        if self.mlflow.registered_model:
            raise ValueError(
                "mlflow.registered_model: a sweep registers no model; set it in the job's own config"
            )


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """A sweep YAML plus `key.sub=value` overrides; unknown keys are errors naming the closest valid key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no sweep config at {path}; see jobs/configs/sweep_*.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(SweepConfig, apply_overrides(data, list(overrides or [])))


def cell_key(job: JobSpec, params: dict[str, Any]) -> str:
    """Stable id of a cell: a hash of the job and the cell's parameters (order-independent)."""
    blob = json.dumps(
        {"job": dataclasses.asdict(job), "params": params}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def expand_cells(cfg: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """(key, params) of every cell: the grid's combinations, then the extra cells; duplicates once."""
    names = list(cfg.grid)
    combos = (
        [dict(zip(names, vals, strict=True)) for vals in itertools.product(*cfg.grid.values())]
        if names
        else []
    )
    out: dict[str, dict[str, Any]] = {}
    for params in combos + [dict(c) for c in cfg.cells]:
        out.setdefault(cell_key(cfg.job, params), params)
    return list(out.items())

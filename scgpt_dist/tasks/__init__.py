"""Downstream tasks, one package each: the method, its baselines and metrics (`method.py`), and the task that
runs them on a checkpoint with a typed config and writes the report (`task.py`). `runner.execute(name, cfg)`
runs one; `python -m jobs.finetune <name>` is its command line; sweeps fan them out as Ray tasks.

Shared by every task: `config` (the `TaskConfig` base and the flags made from it), `runner` (cells, MLflow
run, Ray task), `report` (markdown + figures), `finetune` (the one single-process finetuning loop).
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("annotation", "integration", "perturbation", "multiomics", "grn", "zeroshot")


def task_module(name: str) -> ModuleType:
    """The package of task `name`: it exports `DESCRIPTION`, `Config` and `run(cfg, ctx) -> metrics`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    return importlib.import_module(f"{__name__}.{name}")

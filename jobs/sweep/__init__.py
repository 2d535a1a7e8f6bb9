"""Run a job over a parameter grid as Ray tasks: one MLflow child run per grid cell under one parent run,
resumable, with one comparison table.

    python -m jobs.sweep --config jobs/configs/sweep_annotation.yaml [--concurrency 2] [--dry-run]

A sweep YAML names the job and the grid (see `SweepConfig`)::

    name: annotation-lr-epochs
    output_dir: outputs/sweeps/annotation
    job:
      kind: finetune                 # pretrain | finetune | callable
      task: annotation
      args: [--checkpoint, outputs/synth/run/model, --data, pbmc68k_reduced]
    grid:                            # every combination is one cell
      lr: [1.0e-4, 5.0e-4]           # finetune: the task setting `lr`; pretrain: a config key (train.lr)
      epochs: [2, 5]
    concurrency: 2

Each cell runs in `<output_dir>/cells/<key>/`, where `key` is a stable hash of the job and the cell's
parameters; a finished cell leaves `done.json` (written atomically, with its result). Running the sweep again
skips finished cells and resumes unfinished ones (a pretraining cell continues from its last checkpoint).
The table lands in `<output_dir>/report/` (report.md, results.csv, results.json) and in the parent run's
artifacts.

Jobs:
- `pretrain`: `jobs.pretrain` with `config` + `overrides` + the cell's `key=value` overrides; the cell's
  result is the final training loss, steps, cells, wall time and the consolidated model path.
- `finetune`: the task (`scgpt_dist.tasks`) with `args` parsed as `python -m jobs.finetune <task> <args>` would,
  then the cell's parameters set on its typed config (names are its settings: `lr`, `n_hvg`, `no_scratch`); the
  result is the task's metrics.
- `callable`: `function: package.module:name`, called as `name(params, ctx, **kwargs)` with a `CellContext`;
  it returns a flat dict of results (and may return `run_id` of the MLflow run it made as ctx's child).

Modules: `config` (the job, the grid, the cells it expands to), `cells` (one cell and the runner of each job
kind), `driver` (Ray fan-out, MLflow parent run, the table, the command line).
"""

from jobs.sweep.cells import CellContext, finetune_config, run_cell, run_finetune_cell
from jobs.sweep.config import (
    CELLS_DIR,
    CSV_FILE,
    DONE_FILE,
    REPORT_DIR,
    JobSpec,
    SweepConfig,
    cell_key,
    expand_cells,
    load_sweep_config,
)
from jobs.sweep.driver import SweepResult, init_ray, main, run_sweep
from scgpt_dist.train.tracking import PARENT_RUN_TAG

__all__ = [
    "CELLS_DIR",
    "CSV_FILE",
    "DONE_FILE",
    "PARENT_RUN_TAG",
    "REPORT_DIR",
    "CellContext",
    "JobSpec",
    "SweepConfig",
    "SweepResult",
    "cell_key",
    "expand_cells",
    "finetune_config",
    "init_ray",
    "load_sweep_config",
    "main",
    "run_cell",
    "run_finetune_cell",
    "run_sweep",
]

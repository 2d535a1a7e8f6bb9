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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_ingest.atomic import write_text_atomic
from jobs._cli import run_main, setup_logging
from jobs.finetune.__main__ import parse_task
from scgpt_dist.config import (
    ConfigError,
    MlflowConfig,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
)
from scgpt_dist.tasks import TASKS
from scgpt_dist.tasks.config import with_params
from scgpt_dist.tasks.report import Report
from scgpt_dist.tasks.runner import execute
from scgpt_dist.train.driver import run_pretraining
from scgpt_dist.train.tracking import (
    PARENT_RUN_TAG,
    get_or_create_experiment,
    start_or_resume_run,
    tracking_uri,
)

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


# ------------------------------------------------------------------------------------------------ cells


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


def read_done(cell_dir: Path) -> dict | None:
    path = cell_dir / DONE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is unreadable; the cell runs again", path)
        return None


@dataclass
class CellContext:
    """What a cell knows about where it runs; passed to callables."""

    key: str
    params: dict[str, Any]
    out_dir: Path
    """The cell's own directory (`<sweep>/cells/<key>/`); resuming reuses it."""
    tracking_uri: str
    experiment: str
    parent_run_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def adopt_run(self, run_id: str) -> None:
        """Make `run_id` (e.g. a pretraining run) this cell's child run: parent tag, cell key, params."""
        client = self.client()
        client.set_tag(run_id, PARENT_RUN_TAG, self.parent_run_id)
        client.set_tag(run_id, "sweep.cell", self.key)
        logged = client.get_run(run_id).data.params
        for k, v in self.params.items():
            if f"sweep.{k}" not in logged:
                client.log_param(run_id, f"sweep.{k}", str(v)[:500])

    def new_child_run(self, name: str | None = None) -> str:

        client = self.client()
        exp_id = get_or_create_experiment(client, self.experiment, self.tracking_uri, self.out_dir)
        run = client.create_run(exp_id, run_name=name or f"cell-{self.key}")
        self.adopt_run(run.info.run_id)
        return run.info.run_id


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: apply_overrides parses it back to the same value


def _final_metric(client, run_id: str, name: str) -> float:
    hist = client.get_metric_history(run_id, name)
    return max(hist, key=lambda m: (m.step, m.timestamp)).value if hist else float("nan")


def run_pretrain_cell(job: JobSpec, ctx: CellContext) -> dict[str, Any]:

    overrides = list(job.overrides) + [_override(k, v) for k, v in ctx.params.items()]
    overrides += [
        _override("output_dir", str(ctx.out_dir / "run")),
        _override("mlflow.tracking_uri", ctx.tracking_uri),
        _override("mlflow.experiment", ctx.experiment),
    ]
    summary = run_pretraining(load_config(job.config, overrides))
    ctx.adopt_run(summary["run_id"])
    client = ctx.client()
    return {
        "run_id": summary["run_id"],
        "final_loss": _final_metric(client, summary["run_id"], "loss"),
        "tokens_seen": _final_metric(client, summary["run_id"], "tokens_seen"),
        "step": summary["step"],
        "n_train_cells": summary["n_train_cells"],
        "train_wall_s": summary["train_wall_s"],
        "model_dir": summary.get("model_dir"),
    }


def finetune_config(job: JobSpec, ctx: CellContext):
    """The typed config of one finetune cell: the job's shared arguments, the cell's parameters (each checked
    against the task's settings and converted to its type), and the cell's output and MLflow run."""
    if job.task not in TASKS:
        raise ValueError(f"job.task={job.task!r}; choose one of {list(TASKS)}")
    task, cfg, _ = parse_task([job.task, *job.args, "--out", str(ctx.out_dir / "out")])
    cfg = with_params(cfg, ctx.params)
    return dataclasses.replace(
        cfg,
        tracking_uri=ctx.tracking_uri,
        experiment=ctx.experiment,
        parent_run_id=ctx.parent_run_id,
    )


def run_finetune_cell(job: JobSpec, ctx: CellContext) -> dict[str, Any]:
    result = execute(job.task, finetune_config(job, ctx))
    ctx.adopt_run(result["run_id"])
    return result


def run_callable_cell(job: JobSpec, ctx: CellContext) -> dict[str, Any]:
    module_name, fn_name = job.function.split(":", 1)
    fn = getattr(importlib.import_module(module_name), fn_name)
    result = dict(fn(ctx.params, ctx, **job.kwargs))
    if not result.get("run_id"):
        run_id = ctx.new_child_run()
        client = ctx.client()
        for k, v in _numeric(result).items():
            client.log_metric(run_id, k, v)
        client.set_terminated(run_id, "FINISHED")
        result["run_id"] = run_id
    return result


RUNNERS = {
    "pretrain": run_pretrain_cell,
    "finetune": run_finetune_cell,
    "callable": run_callable_cell,
}


def run_cell(job: JobSpec, ctx: CellContext) -> dict[str, Any]:
    """Run one cell and leave its done marker; returns the marker's content."""
    setup_logging()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = RUNNERS[job.kind](job, ctx)
    done = {
        "key": ctx.key,
        "params": ctx.params,
        "result": result,
        "wall_s": time.perf_counter() - t0,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(ctx.out_dir / DONE_FILE, json.dumps(done, indent=1, default=str))
    return done


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    import math

    return {
        k: float(v)
        for k, v in d.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    rows: list[dict[str, Any]]
    """One row per cell: key, params, status, results."""
    ran: list[str]
    """Keys of cells run by this invocation."""
    reused: list[str]
    """Keys of cells finished earlier (not run again)."""
    failed: dict[str, str]
    """Key -> error of cells that failed in this invocation."""
    report: Path


def init_ray(address: str | None, local_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=local_cpus or (os.cpu_count() or 1) + 2,
        include_dashboard=False,
        log_to_driver=True,
        _node_ip_address="127.0.0.1",
    )


def run_sweep(
    cfg: SweepConfig, dry_run: bool = False, local_cpus: int | None = None
) -> SweepResult:
    """Run every unfinished cell as a Ray task (at most `cfg.concurrency` at once) and write the table."""
    import ray
    from mlflow.tracking import MlflowClient

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = expand_cells(cfg)
    done = {key: read_done(out / CELLS_DIR / key) for key, _ in cells}
    todo = [(k, p) for k, p in cells if done[k] is None]
    log.info(
        "sweep %s: %d cells, %d finished earlier, %d to run",
        cfg.name,
        len(cells),
        len(cells) - len(todo),
        len(todo),
    )
    uri = tracking_uri(cfg.mlflow.tracking_uri, out)
    parent = start_or_resume_run(uri, cfg.mlflow.experiment, cfg.name, out)
    client = MlflowClient(uri)
    if not client.get_run(parent).data.params:
        params = flatten({"job": dataclasses.asdict(cfg.job), "grid": cfg.grid})
        for k, v in params.items():
            client.log_param(parent, k, str(v)[:500])
        client.set_tag(parent, "sweep.n_cells", str(len(cells)))

    failed: dict[str, str] = {}
    ran: list[str] = []
    if todo and not dry_run:
        init_ray(cfg.ray_address, local_cpus)
        # max_calls=1: every cell gets a fresh worker process (no module or memory state carried over
        # from the previous cell; a long sweep sees code and data as they are when its cell starts).
        remote = ray.remote(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_retries=0, max_calls=1
        )(run_cell)
        queue = list(todo)
        in_flight: dict[Any, str] = {}
        while queue or in_flight:
            while queue and len(in_flight) < cfg.concurrency:
                key, params = queue.pop(0)
                ctx = CellContext(
                    key=key,
                    params=params,
                    out_dir=out / CELLS_DIR / key,
                    tracking_uri=uri,
                    experiment=cfg.mlflow.experiment,
                    parent_run_id=parent,
                )
                in_flight[remote.remote(cfg.job, ctx)] = key
                log.info("cell %s started: %s", key, params)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            key = in_flight.pop(ready[0])
            try:
                done[key] = ray.get(ready[0])
                ran.append(key)
                log.info("cell %s finished in %.0f s", key, done[key]["wall_s"])
            except Exception as err:  # one failed cell does not stop the others
                failed[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
                log.error("cell %s failed: %s", key, failed[key])

    rows = []
    for key, params in cells:
        row: dict[str, Any] = {"cell": key, **params}
        if done.get(key):
            row["status"] = "ran" if key in ran else "reused"
            res = done[key]["result"]
            wanted = cfg.metrics or list(_numeric(res))
            row.update({m: res.get(m, float("nan")) for m in wanted})
            row["run_id"] = res.get("run_id", "")
        else:
            row["status"] = "failed" if key in failed else "pending"
            row["error"] = failed.get(key, "")
        rows.append(row)

    report = write_table(cfg, rows, out / REPORT_DIR)
    client.log_artifacts(parent, str(out / REPORT_DIR), artifact_path=REPORT_DIR)
    client.log_metric(parent, "cells_ran", len(ran))
    client.log_metric(parent, "cells_reused", len(cells) - len(todo))
    client.log_metric(parent, "cells_failed", len(failed))
    if failed:
        client.set_terminated(parent, "FAILED")
    elif all(r["status"] in ("ran", "reused") for r in rows):
        client.set_terminated(parent, "FINISHED")
    # else (a dry run with unfinished cells): the parent stays RUNNING until a run finishes the sweep
    return SweepResult(
        parent_run_id=parent,
        tracking_uri=uri,
        rows=rows,
        ran=ran,
        reused=[k for k, _ in cells if k not in ran and done.get(k)],
        failed=failed,
        report=report,
    )


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:

    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def write_table(cfg: SweepConfig, rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """The comparison table as report.md (+ results.json) and results.csv in `out_dir`."""
    rep = Report(f"Sweep {cfg.name}", out_dir)
    job = cfg.job
    what = {
        "pretrain": f"`jobs.pretrain --config {job.config}`",
        "finetune": f"`jobs.finetune {job.task}`",
        "callable": f"`{job.function}`",
    }[job.kind]
    n_done = sum(r["status"] in ("ran", "reused") for r in rows)
    rep.text(
        f"{what} over {', '.join(f'`{k}` in {v}' for k, v in cfg.grid.items()) or 'listed cells'}"
        f"{f' plus {len(cfg.cells)} listed cell(s)' if cfg.cells and cfg.grid else ''}: "
        f"{n_done} of {len(rows)} cells finished. `ran` = run by the last invocation, `reused` = "
        "finished earlier (cells are keyed by a hash of the job and their parameters)."
    )
    rep.table("Results", rows)
    path = rep.write()
    write_csv(rows, out_dir / CSV_FILE)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.sweep", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="sweep YAML (jobs/configs/sweep_*.yaml)")
    parser.add_argument("--concurrency", type=int, help="override the YAML's concurrency")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the cells and write the table; run nothing"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the sweep YAML")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = list(args.overrides)
    if args.concurrency:
        overrides.append(f"concurrency={args.concurrency}")
    cfg = load_sweep_config(args.config, overrides)
    result = run_sweep(cfg, dry_run=args.dry_run)
    print((result.report.parent / "report.md").read_text())
    print(
        f"report: {result.report}\nMLflow parent run {result.parent_run_id} in {result.tracking_uri}"
    )
    return 1 if result.failed else 0


if __name__ == "__main__":
    import sys

    # Ray pickles the cell function by reference: run the importable module's main, not __main__'s copy.
    from jobs.sweep import main as _main

    run_main(lambda: _main(sys.argv[1:]))

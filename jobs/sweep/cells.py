"""One sweep cell: its context (output directory, MLflow child run, parameters) and the runner of each job
kind (`pretrain`, `finetune`, `callable`)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_ingest.atomic import write_text_atomic
from jobs._cli import setup_logging
from jobs.finetune.__main__ import parse_task
from jobs.sweep.config import DONE_FILE, JobSpec
from scgpt_dist.config import load_config
from scgpt_dist.tasks import TASKS
from scgpt_dist.tasks.config import with_params
from scgpt_dist.tasks.runner import execute
from scgpt_dist.train.driver import run_pretraining
from scgpt_dist.train.tracking import PARENT_RUN_TAG, get_or_create_experiment

log = logging.getLogger(__name__)


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


def final_metric(client, run_id: str, name: str) -> float:
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
        "final_loss": final_metric(client, summary["run_id"], "loss"),
        "tokens_seen": final_metric(client, summary["run_id"], "tokens_seen"),
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
        for k, v in numeric_metrics(result).items():
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


def numeric_metrics(d: dict[str, Any]) -> dict[str, float]:
    import math

    return {
        k: float(v)
        for k, v in d.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }

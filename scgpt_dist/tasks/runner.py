"""Running a downstream task: loading its cells, one MLflow run per task (a child run when a sweep passes its
parent), the task body in this process or as a Ray task, and its report.

A task package (`scgpt_dist/tasks/<name>/`) exports::

    DESCRIPTION = "one line"
    Config                                         # a TaskConfig dataclass: the task's settings
    def run(cfg: Config, ctx: TaskContext) -> dict # the work; returns flat {metric: float} for MLflow / sweeps

and `execute(name, cfg)` (or `python -m jobs.finetune <name> --data ... --out ...`) does the rest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from data_ingest import keys
from data_ingest.demo_data import load_pbmc
from data_ingest.soma_store import read_h5ad_checked, validate_anndata
from data_ingest.synth.census import experiment_uri
from scgpt_dist.tasks import task_module
from scgpt_dist.tasks.config import PBMC_SPEC, TaskConfig
from scgpt_dist.tasks.report import Report
from scgpt_dist.train.tracking import PARENT_RUN_TAG, get_or_create_experiment, tracking_uri

log = logging.getLogger(__name__)


def load_cells(
    spec: str, obs_filter: str | None = None, max_cells: int | None = None, seed: int = 0
) -> ad.AnnData:
    """Cells as AnnData with non-negative values and gene symbols as var_names."""
    if spec == PBMC_SPEC:
        adata = load_pbmc()
        adata.obs["cell_type"] = adata.obs["bulk_labels"].astype(str)
        adata.obs["batch"] = "pbmc68k"
    elif spec.endswith(".h5ad"):
        adata = read_h5ad_checked(spec)
    else:
        adata = read_soma(spec, obs_filter)
    if adata.n_obs == 0:
        raise ValueError(
            f"--data {spec} selected no cells (obs filter {obs_filter!r}); widen the filter"
        )
    if max_cells and adata.n_obs > max_cells:
        rng = np.random.default_rng(seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, max_cells, replace=False))].copy()
    validate_anndata(adata, spec)
    return adata


def read_soma(uri: str, obs_filter: str | None = None, layer: str | None = None) -> ad.AnnData:
    """A (small) SOMA experiment, or its census-layout `census_data/<organism>` experiment, as AnnData."""
    import tiledbsoma
    import tiledbsoma.io

    path = Path(uri)
    if (path / keys.CENSUS_DATA).exists():
        uri = experiment_uri(uri)
    if not Path(uri).exists() and "://" not in uri:
        raise FileNotFoundError(f"--data {uri}: no such .h5ad or SOMA experiment")
    with tiledbsoma.Experiment.open(uri) as exp:
        ms = exp.ms[keys.MEASUREMENT_RNA]
        layers = list(ms.X.keys())
        layer = layer or (keys.RAW_LAYER if keys.RAW_LAYER in layers else layers[0])
        with exp.axis_query(
            keys.MEASUREMENT_RNA, obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter)
        ) as q:
            adata = q.to_anndata(X_name=layer)
    if keys.VAR_GENE_NAME in adata.var:
        adata.var_names = adata.var[keys.VAR_GENE_NAME].astype(str).values
    adata.var_names_make_unique()
    return adata


@dataclass
class TaskContext:
    """Where a task writes, and its MLflow run."""

    out_dir: Path
    report: Report
    client: Any = None
    run_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Finite numeric metrics in one batch (one store transaction)."""
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and np.isfinite(v)
        ]
        for start in range(0, len(batch), 1000):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])


def open_mlflow_run(cfg: TaskConfig, task: str) -> tuple[Any, str]:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.tracking_uri, cfg.out)
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, cfg.experiment, uri, cfg.out)
    tags = {"task": task}
    if cfg.parent_run_id:
        tags[PARENT_RUN_TAG] = cfg.parent_run_id
    run = client.create_run(exp_id, run_name=f"{task}-{Path(cfg.out).name}", tags=tags)
    params = [Param(k, str(v)[:500]) for k, v in cfg.params().items()]
    client.log_batch(run.info.run_id, params=params)
    return client, run.info.run_id


def execute(task: str, cfg: TaskConfig) -> dict:
    """Run task `task` with settings `cfg` inside this process: MLflow run, report, result metrics."""
    import torch

    module = task_module(task)
    if not isinstance(cfg, module.Config):
        raise TypeError(f"task {task!r} takes a {module.Config.__name__}, got {type(cfg).__name__}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads or int(cfg.num_cpus)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    client, run_id = open_mlflow_run(cfg, task)
    report = Report(
        f"{task}: {Path(cfg.checkpoint).name if cfg.checkpoint else 'baselines'} on "
        f"{Path(cfg.data).name}",
        out / "report",
    )
    ctx = TaskContext(out_dir=out, report=report, client=client, run_id=run_id)
    try:
        metrics = module.run(cfg, ctx)
        ctx.log_metrics(metrics)
        report.results["metrics"] = metrics
        report.write()
        report.log_to_mlflow(client, run_id)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return {"task": task, "run_id": run_id, "report": str(out / "report" / "report.md"), **metrics}


def execute_as_ray_task(task: str, cfg: TaskConfig) -> dict:
    """Run `execute` as one Ray task (CPU/GPU resources from the config), on the cluster in $RAY_ADDRESS or a
    local Ray instance; this is how sweeps fan tasks out too."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            log_to_driver=True,
            _node_ip_address=None if os.environ.get("RAY_ADDRESS") else "127.0.0.1",
        )

    @ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_retries=0)
    def _task(c: TaskConfig) -> dict:
        logging.basicConfig(
            level=os.environ.get("SCGPT_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return execute(task, c)

    return ray.get(_task.remote(cfg))

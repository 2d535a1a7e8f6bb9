"""What every finetune / evaluation task shares: its command-line arguments, loading the cells, one MLflow
run per task (a child run when a sweep passes its parent), running the task body as a Ray task, and writing
the report.

A task module (`jobs/finetune/<task>.py`) defines::

    DESCRIPTION = "one line"
    def add_arguments(parser): ...            # task-specific flags
    def run(args, ctx: TaskContext) -> dict:  # the work; returns flat {metric: float} for MLflow / sweeps

and `python -m jobs.finetune <task> --checkpoint ... --data ...` does the rest.
"""

from __future__ import annotations

import argparse
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
from data_ingest.synth import experiment_uri
from jobs._cli import setup_logging
from jobs.report import Report
from scgpt_dist.train.tracking import PARENT_RUN_TAG, get_or_create_experiment, tracking_uri

log = logging.getLogger(__name__)

PBMC_SPEC = "pbmc68k_reduced"
FINETUNE_EXPERIMENT = "scgpt-dist-finetune"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        help="consolidated model directory (the `model/` folder `jobs.pretrain` writes); "
        "omit for tasks that only run baselines",
    )
    parser.add_argument(
        "--data",
        required=True,
        help=f"cells: an .h5ad file, a local SOMA experiment URI, or `{PBMC_SPEC}` (bundled with scanpy)",
    )
    parser.add_argument(
        "--obs-filter", help="SOMA obs value_filter, e.g. \"tissue_general == 'blood'\""
    )
    parser.add_argument("--max-cells", type=int, default=None, help="subsample to this many cells")
    parser.add_argument("--out", required=True, help="output directory (report.md, PNGs, results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or a sqlite store in --out)",
    )
    parser.add_argument("--experiment", default=FINETUNE_EXPERIMENT, help="MLflow experiment")
    parser.add_argument("--parent-run-id", help="MLflow parent run (set by sweeps)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the Ray task")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs of the Ray task")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: the task's --num-cpus; more threads than CPUs thrash)",
    )


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


def open_mlflow_run(args: argparse.Namespace, task: str) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(args.tracking_uri, args.out)
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, args.experiment, uri, args.out)
    tags = {"task": task}
    if args.parent_run_id:
        tags[PARENT_RUN_TAG] = args.parent_run_id
    run = client.create_run(exp_id, run_name=f"{task}-{Path(args.out).name}", tags=tags)
    params = {k: v for k, v in vars(args).items() if v is not None and k != "func"}
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    return client, run.info.run_id


def execute(task: str, module, args: argparse.Namespace) -> dict:
    """Run a task body inside this process: MLflow run, report, result metrics."""
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads or int(args.num_cpus)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    client, run_id = open_mlflow_run(args, task)
    report = Report(
        f"{task}: {Path(args.checkpoint).name if args.checkpoint else 'baselines'} on "
        f"{Path(args.data).name}",
        out / "report",
    )
    ctx = TaskContext(out_dir=out, report=report, client=client, run_id=run_id)
    try:
        metrics = module.run(args, ctx)
        ctx.log_metrics(metrics)
        report.results["metrics"] = metrics
        report.write()
        report.log_to_mlflow(client, run_id)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return {"task": task, "run_id": run_id, "report": str(out / "report" / "report.md"), **metrics}


def execute_as_ray_task(task: str, module_name: str, args: argparse.Namespace) -> dict:
    """Run `execute` as one Ray task (CPU/GPU resources from the args), on the cluster in $RAY_ADDRESS or a
    local Ray instance; this is how sweeps fan tasks out too."""
    import importlib

    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            log_to_driver=True,
            _node_ip_address=None if os.environ.get("RAY_ADDRESS") else "127.0.0.1",
        )

    @ray.remote(num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_retries=0)
    def _task(a: argparse.Namespace) -> dict:

        setup_logging()
        return execute(task, importlib.import_module(module_name), a)

    return ray.get(_task.remote(args))

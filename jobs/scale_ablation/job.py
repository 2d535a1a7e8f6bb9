"""The scale ablation as a job: the grid as a `jobs.sweep`, run (resuming), collect, fit, report."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs import scale_ablation
from jobs._cli import setup_logging
from jobs.scale_ablation.config import (
    CELL_METRICS,
    WHOLE,
    ScaleAblationConfig,
    load_ablation_config,
)
from jobs.scale_ablation.report import collect_results, pca_knn_reference, write_ablation_report
from jobs.sweep import JobSpec, SweepConfig, init_ray, run_sweep
from scgpt_dist.config import (
    MlflowConfig,
)

log = logging.getLogger(__name__)


def grid_cells(cfg: ScaleAblationConfig) -> list[dict[str, Any]]:
    """Cell parameters: every (model, D) on the whole census, then the context arm (organ-restricted, and the
    whole-census twin of each organ cell)."""
    cells = [
        {"model": asdict(m), "n_cells": d, "tissue": WHOLE} for m in cfg.models for d in cfg.n_cells
    ]
    if cfg.context.tissue:
        for name in cfg.context.models:
            for d in cfg.context.n_cells:
                for tissue in (cfg.context.tissue, WHOLE):
                    cell = {"model": asdict(cfg.model(name)), "n_cells": d, "tissue": tissue}
                    if cell not in cells:
                        cells.append(cell)
    return cells


def sweep_config(cfg: ScaleAblationConfig):
    """The ablation as a `jobs.sweep` config: a callable job whose kwargs are what every cell shares."""
    return SweepConfig(
        name=cfg.name,
        output_dir=cfg.output_dir,
        job=JobSpec(
            kind="callable",
            function="jobs.scale_ablation.cell:run_ablation_cell",
            kwargs={
                "base": cfg.base,
                "steps": asdict(cfg.steps),
                "eval": asdict(cfg.eval),
                "finetune": asdict(cfg.finetune),
                "context_tissue": cfg.context.tissue,
            },
        ),
        cells=grid_cells(cfg),
        concurrency=cfg.concurrency,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        metrics=list(CELL_METRICS),
        mlflow=MlflowConfig(tracking_uri=cfg.mlflow.tracking_uri, experiment=cfg.mlflow.experiment),
        ray_address=cfg.ray_address,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.scale_ablation", description=scale_ablation.__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="jobs/configs/scale_ablation_*.yaml")
    parser.add_argument(
        "--report-only", action="store_true", help="run no cells; collect, fit and report"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_ablation_config(args.config, args.overrides)
    result = run_ablation(cfg, report_only=args.report_only)
    print(Path(result["report"]).read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=str))
    return 1 if result["failed"] else 0


def run_ablation(cfg: ScaleAblationConfig, report_only: bool = False) -> dict:
    """Run the grid (resuming), collect from MLflow, fit, report (also as the parent run's artifacts)."""
    import os

    from mlflow.tracking import MlflowClient

    scfg = sweep_config(cfg)
    if not report_only:
        workers = cfg.base.get("train", {}).get("num_workers", 2)
        init_ray(cfg.ray_address, cfg.ray_num_cpus or (os.cpu_count() or 1) + workers + 1)
    sweep = run_sweep(scfg, dry_run=report_only)
    rows = collect_results(sweep.tracking_uri, sweep.parent_run_id, [r["cell"] for r in sweep.rows])
    out = Path(cfg.output_dir).resolve() / "ablation_report"
    pca_knn = pca_knn_reference(cfg) if rows else None
    report, fit = write_ablation_report(cfg, rows, out, pca_knn)
    client = MlflowClient(sweep.tracking_uri)
    client.log_artifacts(sweep.parent_run_id, str(out), artifact_path="ablation_report")
    if fit is not None:
        for k, v in fit.params.items():
            client.log_metric(sweep.parent_run_id, f"fit_{k}", v)
    return {
        "report": str(report),
        "parent_run_id": sweep.parent_run_id,
        "tracking_uri": sweep.tracking_uri,
        "rows": rows,
        "fit": fit.to_dict() if fit else None,
        "ran": sweep.ran,
        "reused": sweep.reused,
        "failed": sweep.failed,
    }

"""The sweep driver: cells fanned out as Ray tasks under one MLflow parent run, resumable, and the comparison
table; `python -m jobs.sweep`."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_ingest.atomic import write_text_atomic
from jobs._cli import setup_logging
from jobs.sweep.cells import CellContext, numeric_metrics, read_done, run_cell
from jobs.sweep.config import (
    CELLS_DIR,
    CSV_FILE,
    REPORT_DIR,
    SweepConfig,
    expand_cells,
    load_sweep_config,
)
from scgpt_dist.config import flatten
from scgpt_dist.tasks.report import Report
from scgpt_dist.train.tracking import start_or_resume_run, tracking_uri

log = logging.getLogger(__name__)


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
            wanted = cfg.metrics or list(numeric_metrics(res))
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
        prog="python -m jobs.sweep",
        description="Run a job over a parameter grid as Ray tasks: one MLflow child run per cell, resumable.",
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

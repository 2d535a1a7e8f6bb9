"""MLflow: where the store is, and one run per training job (continued when the job resumes)."""

from __future__ import annotations

import os
from pathlib import Path

RUN_ID_FILE = "mlflow_run_id"
PARENT_RUN_TAG = "mlflow.parentRunId"
"""The tag MLflow's UI nests a child run under its parent with (sweeps, scale ablations, finetune tasks)."""


def tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """Configured URI, else $MLFLOW_TRACKING_URI, else a sqlite store inside the output directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path(output_dir).resolve() / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def get_or_create_experiment(client, name: str, uri: str, output_dir: str | Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def start_or_resume_run(uri: str, experiment: str, run_name: str, output_dir: str | Path) -> str:
    """Run id for this job: the one recorded in `output_dir` if it still exists, else a new run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    marker = Path(output_dir) / RUN_ID_FILE
    if marker.is_file():
        run_id = marker.read_text().strip()
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                return run_id
        except MlflowException:
            pass
    exp_id = get_or_create_experiment(client, experiment, uri, output_dir)
    run = client.create_run(exp_id, run_name=run_name)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id

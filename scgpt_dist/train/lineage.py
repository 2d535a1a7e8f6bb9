"""What made a run: the code (git commit, dirty flag, package versions) and the data (an MLflow dataset
input naming the SOMA source, census version, filters, cell count and a digest of the exact cell set).

A scaling-law fit or a re-pretraining gate compares runs; this is how it knows which code and which cells
each one saw. Every pretraining run records it once, when the run is created."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGES = (
    "scgpt-dist",
    "torch",
    "ray",
    "deepspeed",
    "tiledbsoma",
    "cellxgene-census",
    "mlflow",
    "numpy",
    "pyarrow",
    "flash-attn",
)
"""Distributions whose versions a run records (tags `version.<name>`; absent ones are skipped)."""

GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "scgpt.git.dirty"
DATASET_CONTEXT = "training"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, str]:
    """`{commit, dirty}` of the source tree this package runs from; empty when it is not a git checkout
    (an installed wheel, a container image without .git)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": str(bool(status)).lower()}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def joinid_digest(joinids: np.ndarray) -> str:
    """sha256 (first 16 hex digits) of the sorted soma_joinids: equal exactly when the cell sets are."""
    ids = np.sort(np.asarray(joinids, dtype=np.int64))
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


def dataset_entity(source_cfg, digest: str, n_cells: int, n_genes: int, split: str = "train"):
    """The MLflow `Dataset` of a run's cells: its source (URI, census version, layer, filters) and profile."""
    from mlflow.entities import Dataset

    source = {
        "uri": source_cfg.soma_uri,
        "census_version": source_cfg.census_version,
        "organism": source_cfg.organism,
        "measurement": source_cfg.measurement,
        "layer": source_cfg.layer,
        "obs_filter": source_cfg.value_filter,
        "primary_only": source_cfg.primary_only,
        "tissues": source_cfg.tissues,
        "assays": source_cfg.assays,
        "split": split,
        "holdout_fraction": source_cfg.holdout_fraction,
        "split_seed": source_cfg.split_seed,
    }
    name = source_cfg.census_version and f"census-{source_cfg.census_version}"
    return Dataset(
        name=f"{name or Path(str(source_cfg.soma_uri).rstrip('/')).name}:{split}",
        digest=digest,
        source_type="soma",
        source=json.dumps(source, sort_keys=True),
        profile=json.dumps({"n_cells": int(n_cells), "n_genes": int(n_genes)}),
    )


def log_lineage(client, run_id: str, source_cfg, digest: str, n_cells: int, n_genes: int) -> None:
    """Tag the run with its code and log its training cells as a dataset input."""
    from mlflow.entities import DatasetInput, InputTag, RunTag

    tags = {f"version.{k}": v for k, v in package_versions().items()}
    git = git_info()
    if git:
        tags[GIT_COMMIT_TAG] = git["commit"]
        tags[GIT_DIRTY_TAG] = git["dirty"]
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    dataset = dataset_entity(source_cfg, digest, n_cells, n_genes)
    client.log_inputs(
        run_id,
        datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", DATASET_CONTEXT)])],
    )

"""Append new .h5ad datasets to an existing SOMA experiment (`python -m data_ingest.ingest`).

Each file becomes one dataset (`dataset_id` = file stem unless given). Cells and genes are registered with
`tiledbsoma.io.register_anndatas` and appended with `tiledbsoma.io.from_anndata(registration_mapping=...)`:
existing soma_joinids never move, new genes get new var rows. The gene vocabulary (`vocab.json`) is extended
in place with stable ids (existing ids never change). Every ingest is recorded in an ingest log next to the
experiment (`<experiment>.ingest_log.json`: file, sha256, dataset, cells, new genes, UTC time); a file
already in the log is skipped, so re-running the same ingest is a no-op.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.atomic import file_sha256
from data_ingest.soma_store import (
    read_h5ad_checked,
    to_census_layout,
    validate_anndata,
    write_experiment,
)
from data_ingest.vocab import GeneVocab, write_text_atomic

LOG_SUFFIX = ".ingest_log.json"


@dataclass
class IngestEntry:
    """One ingested file, as recorded in the ingest log."""

    file: str
    sha256: str
    dataset_id: str
    n_cells: int
    n_genes: int
    new_genes: int
    added_at: str


@dataclass
class IngestReport:
    added: list[IngestEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Files already in the ingest log (no-op)."""
    vocab_added: list[str] = field(default_factory=list)


def log_path(experiment_uri: str | Path) -> Path:
    return Path(str(experiment_uri).rstrip("/") + LOG_SUFFIX)


def read_log(experiment_uri: str | Path) -> list[dict]:
    path = log_path(experiment_uri)
    return json.loads(path.read_text()) if path.exists() else []


def check_counts(adata: ad.AnnData, name: str) -> None:
    """Raw counts only: integer values, no empty cells (clear errors otherwise)."""
    validate_anndata(adata, name)
    X = adata.X if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    X = sp.csr_matrix(X)
    if X.nnz and not np.array_equal(X.data, np.round(X.data)):
        bad = X.data[X.data != np.round(X.data)][:3].tolist()
        raise ValueError(
            f"{name}: the counts layer has non-integer values (e.g. {bad}); ingest raw counts "
            "(adata.raw.X or adata.layers['counts']), not normalized data"
        )
    X.eliminate_zeros()
    empty = np.flatnonzero(np.diff(X.indptr) == 0)
    if len(empty):
        names = adata.obs_names[empty[:3]].tolist()
        raise ValueError(
            f"{name}: {len(empty)} cells have no expressed genes (e.g. {names}); drop them first "
            "(scanpy.pp.filter_cells(adata, min_genes=1))"
        )


def _conform(adata: ad.AnnData, dataset_id: str, obs_schema: pa.Schema) -> ad.AnnData:
    """The AnnData with exactly the experiment's obs columns (missing ones get neutral defaults)."""
    src = adata.obs
    obs = pd.DataFrame(index=[f"{dataset_id}:{i}" for i in adata.obs_names])
    for f in obs_schema:
        name = f.name
        if name in (keys.SOMA_JOINID, keys.OBS_ID):
            continue
        if name == keys.OBS_DATASET:
            obs[name] = dataset_id
        elif name in src:
            col = src[name]
            obs[name] = (
                col.astype(str).to_numpy()
                if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                else col.to_numpy()
            )
        elif pa.types.is_boolean(f.type):
            obs[name] = name == keys.OBS_IS_PRIMARY
        elif pa.types.is_integer(f.type):
            obs[name] = np.zeros(len(obs), f.type.to_pandas_dtype())
        elif pa.types.is_floating(f.type):
            obs[name] = np.zeros(len(obs), f.type.to_pandas_dtype())
        else:
            obs[name] = "unknown"
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    if keys.OBS_NNZ in obs:
        obs[keys.OBS_NNZ] = np.diff(X.indptr).astype(np.int64)
    if keys.OBS_RAW_SUM in obs:
        obs[keys.OBS_RAW_SUM] = np.asarray(X.sum(1)).ravel().astype(np.float64)
    obs.index.name = keys.OBS_ID
    genes = adata.var_names.astype(str)
    var = pd.DataFrame(index=pd.Index(genes, name=keys.VAR_ID))
    var[keys.VAR_GENE_NAME] = genes
    var[keys.VAR_GENE_ID] = genes
    return ad.AnnData(X=X, obs=obs, var=var)


def _create_experiment(uri: str, first: Path, dataset_id: str, layer: str) -> IngestEntry:
    """A new census-layout experiment holding `first` (its cell types in obs `cell_type` if it has them).

    Written whole under a temporary path and renamed into place; the file is then recorded in the ingest log
    like any other, so `ingest_h5ads` skips it and appends the rest."""
    adata = read_h5ad_checked(first)
    check_counts(adata, str(first))
    cell_type = keys.OBS_CELL_TYPE if keys.OBS_CELL_TYPE in adata.obs else None
    census = to_census_layout(adata, dataset_id, cell_type, "counts")
    write_experiment(uri, [census], layer=layer)
    entry = IngestEntry(
        file=str(first.resolve()),
        sha256=file_sha256(first),
        dataset_id=dataset_id,
        n_cells=adata.n_obs,
        n_genes=adata.n_vars,
        new_genes=adata.n_vars,
        added_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    write_text_atomic(log_path(uri), json.dumps([asdict(entry)], indent=1))
    return entry


def ingest_h5ads(
    experiment_uri: str | Path,
    files: list[str | Path],
    *,
    vocab_path: str | Path | None = None,
    dataset_ids: list[str] | None = None,
    layer: str = keys.RAW_LAYER,
    measurement: str = keys.MEASUREMENT_RNA,
    create: bool = False,
) -> IngestReport:
    """Append each new file to the experiment; extend `vocab_path` (if given); record it in the log.

    With `create`, a missing experiment is first written (atomically, census columns) from the first file;
    the other files are then appended."""
    import tiledbsoma
    import tiledbsoma.io

    uri = str(experiment_uri)
    report = IngestReport()
    ids = dataset_ids or [Path(f).stem for f in files]
    if len(ids) != len(files):
        raise ValueError(f"{len(files)} files but {len(ids)} dataset ids; give one per file")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"no .h5ad file at {', '.join(missing)}; check the paths")
    if not tiledbsoma.Experiment.exists(uri):
        if not create:
            raise FileNotFoundError(
                f"no SOMA experiment at {uri}; pass --create to make a new one from these files, "
                "or check --experiment"
            )
        report.added.append(_create_experiment(uri, Path(files[0]), ids[0], layer))
    logged = read_log(uri)
    seen = {e["sha256"] for e in logged}
    with tiledbsoma.Experiment.open(uri) as exp:
        obs_schema = exp.obs.schema
        existing = set(
            exp.obs.read(column_names=[keys.OBS_DATASET]).concat()[keys.OBS_DATASET].to_pylist()
        )
        if keys.OBS_ID not in obs_schema.names:
            raise ValueError(
                f"{uri} obs has no {keys.OBS_ID!r} column to register new cells against; write the "
                "experiment with data_ingest (soma_store / synth) or tiledbsoma.io.from_anndata"
            )
    vocab = GeneVocab.load(vocab_path) if vocab_path and Path(vocab_path).exists() else None
    for path, dataset_id in zip(files, ids, strict=True):
        path = Path(path)
        digest = file_sha256(path)
        if digest in seen:
            if not any(e.sha256 == digest for e in report.added):  # not the file --create wrote
                report.skipped.append(str(path))
            continue
        if dataset_id in existing:
            raise ValueError(
                f"dataset_id {dataset_id!r} is already in {uri} from another file; pass a new id "
                "(--dataset-id) or drop the old dataset first"
            )
        adata = read_h5ad_checked(path)
        check_counts(adata, str(path))
        new = _conform(adata, dataset_id, obs_schema)
        with tiledbsoma.Experiment.open(uri) as exp:
            var_names = set(
                exp.ms[measurement]
                .var.read(column_names=[keys.VAR_ID])
                .concat()[keys.VAR_ID]
                .to_pylist()
            )
        mapping = tiledbsoma.io.register_anndatas(
            uri,
            [new],
            measurement_name=measurement,
            obs_field_name=keys.OBS_ID,
            var_field_name=keys.VAR_ID,
        )
        mapping.prepare_experiment(uri)
        tiledbsoma.io.from_anndata(
            uri,
            new,
            measurement_name=measurement,
            registration_mapping=mapping,
            X_layer_name=layer,
        )
        added_genes = [g for g in new.var_names if g not in var_names]
        if vocab is not None:
            report.vocab_added += vocab.extend(new.var_names)
        entry = IngestEntry(
            file=str(path.resolve()),
            sha256=digest,
            dataset_id=dataset_id,
            n_cells=new.n_obs,
            n_genes=new.n_vars,
            new_genes=len(added_genes),
            added_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        logged.append(asdict(entry))
        seen.add(digest)
        existing.add(dataset_id)
        report.added.append(entry)
        write_text_atomic(log_path(uri), json.dumps(logged, indent=1))
    if vocab is not None and report.vocab_added:
        vocab.save(vocab_path)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_ingest.ingest", description=__doc__.split("\n")[0]
    )
    p.add_argument("files", nargs="+", help=".h5ad files with raw counts in X")
    p.add_argument("--experiment", required=True, help="SOMA experiment URI to append to")
    p.add_argument("--vocab", default=None, help="vocab.json to extend with new genes (stable ids)")
    p.add_argument(
        "--dataset-id", action="append", default=None, help="one per file (default: stem)"
    )
    p.add_argument("--layer", default=keys.RAW_LAYER)
    p.add_argument(
        "--create",
        action="store_true",
        help="make the experiment from the files if it does not exist",
    )
    a = p.parse_args(argv)
    rep = ingest_h5ads(
        a.experiment,
        a.files,
        vocab_path=a.vocab,
        dataset_ids=a.dataset_id,
        layer=a.layer,
        create=a.create,
    )
    for e in rep.added:
        print(f"added {e.dataset_id}: {e.n_cells} cells, {e.new_genes} new genes ({e.file})")
    for f in rep.skipped:
        print(f"skipped {f}: already ingested (see {log_path(a.experiment)})")
    if a.vocab:
        print(f"vocabulary {a.vocab}: {len(rep.vocab_added)} genes appended")
    return 0


if __name__ == "__main__":
    from data_ingest.cli import run_main

    run_main(main)

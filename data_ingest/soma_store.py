"""Write AnnData into a local TileDB-SOMA experiment with the CELLxGENE Census layout, atomically.

Layout: `ms["RNA"].X[<layer>]` (sparse, cells x genes), `ms["RNA"].var` with `feature_name` / `feature_id`,
`obs` with `dataset_id`, `cell_type` and whatever other columns the AnnData carries.
The experiment is written under a temporary sibling path and renamed into place when complete, so a failed
ingest never leaves a half-written experiment behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.atomic import atomic_directory

log = logging.getLogger(__name__)


def read_h5ad_checked(path: str | os.PathLike) -> ad.AnnData:
    """Read an .h5ad file, turning the usual failures into errors that say what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .h5ad file at {path}; check the path")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types for damaged files
        raise ValueError(
            f"{path} is not a readable .h5ad file ({type(err).__name__}: {err}); "
            "re-export it with anndata.AnnData.write_h5ad"
        ) from err


def validate_anndata(adata: ad.AnnData, name: str = "AnnData") -> None:
    """Check what tokenization relies on: gene names, cells, non-negative finite values."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{name} is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    names = pd.Index(adata.var_names.astype(str))
    looks_numeric = names.str.fullmatch(r"\d+").all()
    if looks_numeric:
        raise ValueError(
            f"{name} has no gene names (var_names are 0..n-1); set adata.var_names to gene symbols "
            "or pass --gene-column with the var column that holds them"
        )
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"{name} has duplicate gene names {dup}; call adata.var_names_make_unique()"
        )
    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if data.size and not np.isfinite(data).all():
        raise ValueError(f"{name} has NaN or infinite expression values; fix or drop those cells")
    if data.size and data.min() < 0:
        raise ValueError(
            f"{name} has negative expression values (min {data.min():.3g}), e.g. scaled data; "
            "pass raw counts or log-normalized values (adata.raw or a counts layer)"
        )


def to_census_layout(
    adata: ad.AnnData, dataset_id: str, cell_type_key: str | None, value_kind: str
) -> ad.AnnData:
    """A copy with census column names: obs `dataset_id`, `cell_type`, `value_kind`; var `feature_name`."""
    validate_anndata(adata, dataset_id)
    X = adata.X if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    obs = adata.obs.copy()
    obs.index = [f"{dataset_id}:{i}" for i in adata.obs_names]
    obs[keys.OBS_DATASET] = dataset_id
    if cell_type_key is not None:
        if cell_type_key not in obs:
            raise ValueError(
                f"{dataset_id}: no obs column {cell_type_key!r}; choose one of {list(obs.columns)}"
            )
        obs[keys.OBS_CELL_TYPE] = obs[cell_type_key].astype(str)
    elif keys.OBS_CELL_TYPE not in obs:
        obs[keys.OBS_CELL_TYPE] = "unknown"
    obs["value_kind"] = value_kind
    for col in obs.columns:  # SOMA wants plain types; categories become strings
        if isinstance(obs[col].dtype, pd.CategoricalDtype):
            obs[col] = obs[col].astype(str)
    var = pd.DataFrame(index=adata.var_names.astype(str))
    var[keys.VAR_GENE_NAME] = var.index
    var[keys.VAR_GENE_ID] = var.index
    return ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=obs, var=var)


def write_experiment(
    uri: str | os.PathLike,
    datasets: Sequence[ad.AnnData],
    layer: str = keys.RAW_LAYER,
    overwrite: bool = False,
) -> Path:
    """Write datasets (already in census layout) as one SOMA experiment at `uri`, atomically.

    Genes are the union over datasets (a gene absent from a dataset is stored as zeros, i.e. not stored).
    """
    import tiledbsoma.io

    uri = Path(uri).resolve()
    if uri.exists() and not overwrite:
        raise FileExistsError(
            f"a SOMA experiment already exists at {uri}; pass overwrite=True or another path"
        )
    if not datasets:
        raise ValueError("no datasets to write")
    combined = ad.concat(list(datasets), join="outer", merge="first", fill_value=0)
    combined.X = sp.csr_matrix(combined.X, dtype=np.float32)
    combined.var[keys.VAR_GENE_NAME] = combined.var_names.astype(str)
    combined.var[keys.VAR_GENE_ID] = combined.var_names.astype(str)
    with atomic_directory(uri, create=False) as tmp:
        tiledbsoma.io.from_anndata(
            str(tmp), combined, measurement_name=keys.MEASUREMENT_RNA, X_layer_name=layer
        )
    log.info("wrote SOMA experiment %s: %d cells x %d genes", uri, combined.n_obs, combined.n_vars)
    return uri

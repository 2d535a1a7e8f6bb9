"""The embedded default data: real PBMCs from scanpy plus a synthetic census-like dataset, in one SOMA
experiment on local disk.

scanpy's `pbmc68k_reduced` ships 700 real cells x 765 genes; its `.raw` holds log-normalized values, not counts
(its `.X` is scaled and has negative values, so it is never used). scGPT binning ranks each cell's own non-zero
values, so binning the log-normalized values gives the same bins as the counts would (up to ties). The
experiment stores both datasets in one X layer named `data` and marks each cell's kind in obs `value_kind`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad

from data_ingest.soma_store import to_census_layout, write_experiment
from data_ingest.synth.small import SynthConfig, make_synthetic

log = logging.getLogger(__name__)

DEMO_LAYER = "data"
PBMC_DATASET = "pbmc68k_reduced"
SYNTH_DATASET_PREFIX = "synthetic"


def load_pbmc() -> ad.AnnData:
    """scanpy's bundled pbmc68k_reduced, log-normalized `.raw` values with obs intact."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    raw = adata.raw.to_adata()
    raw.obs = adata.obs.copy()
    return raw


def build_demo_experiment(
    uri: str | Path, synth_cells: int = 2000, overwrite: bool = False
) -> Path:
    """Write the demo SOMA experiment: pbmc68k_reduced (cell types in `cell_type`) + synthetic batches."""
    pbmc = load_pbmc()
    parts = [to_census_layout(pbmc, PBMC_DATASET, "bulk_labels", "log_normalized")]
    if synth_cells > 0:
        synth = make_synthetic(SynthConfig(n_cells=synth_cells), gene_names=list(pbmc.var_names))
        for b in sorted(synth.obs["batch"].unique()):
            part = synth[synth.obs["batch"] == b].copy()
            parts.append(
                to_census_layout(part, f"{SYNTH_DATASET_PREFIX}_{b}", "cell_type", "counts")
            )
    return write_experiment(uri, parts, layer=DEMO_LAYER, overwrite=overwrite)

"""A small synthetic AnnData with planted structure: cell types with marker-gene programs, batch effects, and
count-like sparse values (gamma-Poisson, i.e. negative binomial). Ground truth (each type's marker genes) is
in `uns["planted_programs"]` so evaluations can check what a model recovers."""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class SynthConfig:
    """Shape and strength of the planted structure."""

    n_cells: int = 2000
    """Cells to generate."""
    n_genes: int = 765
    """Genes (ignored when gene names are given)."""
    n_cell_types: int = 6
    """Cell types, each with its own marker program."""
    n_batches: int = 3
    """Batches (datasets); each scales genes and library size differently."""
    markers_per_type: int = 25
    """Genes up-regulated in each type."""
    marker_fold: float = 6.0
    """Fold change of a marker gene in its type."""
    batch_sd: float = 0.4
    """SD of the per-batch, per-gene log scale (batch effect)."""
    mean_library_size: float = 1500.0
    """Mean total counts per cell."""
    dispersion: float = 0.3
    """Negative-binomial dispersion (variance = mu + dispersion * mu^2)."""
    seed: int = 0


def make_synthetic(cfg: SynthConfig, gene_names: list[str] | None = None) -> ad.AnnData:
    """Counts AnnData with obs `cell_type`, `batch`; rows grouped by batch like census datasets."""
    rng = np.random.default_rng(cfg.seed)
    genes = (
        list(gene_names) if gene_names is not None else [f"SYN{i:05d}" for i in range(cfg.n_genes)]
    )
    g = len(genes)
    base = rng.lognormal(mean=0.0, sigma=1.5, size=g)
    base /= base.sum()
    programs = np.zeros((cfg.n_cell_types, g))
    planted = {}
    # Markers come from the better-expressed half of genes, as real marker genes (LYZ, CD79A, NKG7) do;
    # a 6x change of a gene seen once per thousand cells would be invisible in any single cell.
    expressed = np.argsort(base)[g // 2 :]
    for t in range(cfg.n_cell_types):
        markers = rng.choice(expressed, cfg.markers_per_type, replace=False)
        programs[t, markers] = np.log(cfg.marker_fold)
        planted[f"type_{t}"] = [genes[i] for i in sorted(markers)]
    batch_scale = rng.normal(0.0, cfg.batch_sd, size=(cfg.n_batches, g))
    batch_lib = rng.lognormal(0.0, 0.3, size=cfg.n_batches)

    batch = np.sort(rng.integers(0, cfg.n_batches, cfg.n_cells))
    ctype = rng.integers(0, cfg.n_cell_types, cfg.n_cells)
    lib = rng.lognormal(np.log(cfg.mean_library_size), 0.4, cfg.n_cells) * batch_lib[batch]
    logits = np.log(base)[None, :] + programs[ctype] + batch_scale[batch]
    prop = np.exp(logits - logits.max(1, keepdims=True))
    prop /= prop.sum(1, keepdims=True)
    mu = prop * lib[:, None]
    shape = 1.0 / cfg.dispersion
    lam = rng.gamma(shape, mu / shape)
    counts = rng.poisson(lam).astype(np.float32)

    obs = pd.DataFrame(
        {
            "cell_type": [f"type_{t}" for t in ctype],
            "batch": [f"batch_{b}" for b in batch],
        },
        index=[f"synth_{i}" for i in range(cfg.n_cells)],
    )
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
    adata.uns["planted_programs"] = planted
    return adata

"""An independent simulator for checking that results are not tuned to `data_ingest.synth`.

It follows the Splat model of Splatter (Zappia, Phipson & Oshlack, Genome Biology 2017), which shares nothing
with our generator but the idea of counts: gamma gene means with high-expression outliers, log-normal
library sizes, groups (cell types) defined by log-normal differential-expression factors on a random subset
of genes, per-batch log-normal gene factors, biological coefficient of variation shrinking with the mean
(gamma-Poisson), then logistic dropout. Groups have unequal sizes and batches unequal group mixes, as atlases
do. Written as a plain census-layout SOMA experiment (obs `cell_type`, `dataset_id`; layer `raw`).

    python -m data_ingest.synth.splat --out /tmp/splat --cells 20000 --genes 2000 --groups 10 --batches 8
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.soma_store import to_census_layout, write_experiment


@dataclass
class SplatConfig:
    """Splat parameters (names follow Splatter's; defaults are Splatter's except where noted)."""

    n_cells: int = 20_000
    """Cells to generate."""
    n_genes: int = 2_000
    """Genes."""
    n_groups: int = 10
    """Groups (cell types); sizes drawn from a Dirichlet, so some types are rare."""
    n_batches: int = 8
    """Batches (datasets), each with its own gene factors, depth and group mix."""
    mean_shape: float = 0.6
    mean_rate: float = 0.3
    """Gene means ~ Gamma(mean_shape, 1/mean_rate)."""
    out_prob: float = 0.05
    out_fac_loc: float = 4.0
    out_fac_scale: float = 0.5
    """Expression outliers: a fraction of genes scaled by a log-normal factor."""
    lib_loc: float = 8.0
    lib_scale: float = 0.4
    """Library size ~ LogNormal(lib_loc, lib_scale) (Splatter's default 11 is full-length depth; 8 is
    ~3,000 UMIs, droplet-like)."""
    batch_lib_sd: float = 0.3
    """SD of each batch's shift of log library size."""
    de_prob: float = 0.08
    de_down_prob: float = 0.5
    de_fac_loc: float = 0.8
    de_fac_scale: float = 0.4
    """Differential expression of each group against the rest (Splatter: 0.1, 0.5, 0.1, 0.4; a stronger
    location so types are distinct at droplet depth)."""
    batch_fac_loc: float = 0.1
    batch_fac_scale: float = 0.2
    """Per-batch, per-gene log-normal factor."""
    bcv_common: float = 0.1
    bcv_df: float = 60.0
    """Biological coefficient of variation (its scaled-inverse-chi-squared spread)."""
    dropout: bool = False
    dropout_mid: float = 0.0
    dropout_shape: float = -1.0
    """Logistic dropout on the log mean (Splatter's `dropout.type = "experiment"`; off by default, as in
    Splatter: droplet counts need no zero inflation beyond the gamma-Poisson)."""
    seed: int = 0


def simulate(cfg: SplatConfig) -> ad.AnnData:
    """Counts AnnData (cells grouped by batch) with obs `cell_type` and `dataset_id`."""
    rng = np.random.default_rng(cfg.seed)
    c, g = cfg.n_cells, cfg.n_genes
    gene_mean = rng.gamma(cfg.mean_shape, 1.0 / cfg.mean_rate, size=g)
    outlier = rng.random(g) < cfg.out_prob
    gene_mean[outlier] *= rng.lognormal(cfg.out_fac_loc, cfg.out_fac_scale, size=outlier.sum())

    group_p = rng.dirichlet(np.full(cfg.n_groups, 2.0))
    de = np.ones((cfg.n_groups, g))
    for k in range(cfg.n_groups):
        hit = rng.random(g) < cfg.de_prob
        fac = rng.lognormal(cfg.de_fac_loc, cfg.de_fac_scale, size=hit.sum())
        down = rng.random(hit.sum()) < cfg.de_down_prob
        fac[down] = 1.0 / fac[down]
        de[k, hit] = fac

    batch = np.sort(rng.integers(0, cfg.n_batches, size=c))  # grouped by batch, as census datasets
    group = np.empty(c, dtype=np.int64)
    for b in range(cfg.n_batches):
        rows = batch == b
        mix = rng.dirichlet(group_p * 20.0)  # each batch over- and under-samples some types
        group[rows] = rng.choice(cfg.n_groups, size=rows.sum(), p=mix)
    batch_fac = rng.lognormal(cfg.batch_fac_loc, cfg.batch_fac_scale, size=(cfg.n_batches, g))
    lib_shift = rng.normal(0.0, cfg.batch_lib_sd, size=cfg.n_batches)
    lib = rng.lognormal(cfg.lib_loc + lib_shift[batch], cfg.lib_scale)

    rows, cols, vals = [], [], []
    for start in range(0, c, 2048):
        sl = slice(start, min(c, start + 2048))
        mu = gene_mean[None, :] * de[group[sl]] * batch_fac[batch[sl]]  # (n, G)
        mu = mu / mu.sum(axis=1, keepdims=True) * lib[sl, None]
        bcv = (cfg.bcv_common + 1.0 / np.sqrt(mu)) * np.sqrt(
            cfg.bcv_df / rng.chisquare(cfg.bcv_df, size=(mu.shape[0], 1))
        )
        true_mean = rng.gamma(1.0 / bcv**2, mu * bcv**2)
        counts = rng.poisson(true_mean)
        if cfg.dropout:
            p_drop = 1.0 / (1.0 + np.exp(-cfg.dropout_shape * (np.log(mu) - cfg.dropout_mid)))
            counts = np.where(rng.random(mu.shape) >= p_drop, counts, 0)
        m = sp.csr_matrix(counts.astype(np.float32))
        coo = m.tocoo()
        rows.append(coo.row + start)
        cols.append(coo.col)
        vals.append(coo.data)
    X = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(c, g),
        dtype=np.float32,
    )
    obs = pd.DataFrame(
        {
            keys.OBS_CELL_TYPE: [f"group{k + 1}" for k in group],
            keys.OBS_DATASET: [f"splat-batch{b + 1}" for b in batch],
        },
        index=[f"cell{i}" for i in range(c)],
    )
    var = pd.DataFrame(index=[f"SPLAT{j:05d}" for j in range(g)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    nonempty = np.diff(X.indptr) > 0  # Splat can make empty cells at low depth; census has none
    return adata[nonempty].copy()


def write_splat_experiment(uri: str | Path, cfg: SplatConfig, overwrite: bool = False) -> Path:
    """Simulate and write one census-layout SOMA experiment (one dataset per batch)."""
    adata = simulate(cfg)
    parts = []
    for name in pd.unique(adata.obs[keys.OBS_DATASET]):
        part = adata[adata.obs[keys.OBS_DATASET] == name].copy()
        part.obs = part.obs.drop(columns=[keys.OBS_DATASET])
        parts.append(to_census_layout(part, str(name), keys.OBS_CELL_TYPE, "counts"))
    return write_experiment(uri, parts, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_ingest.synth.splat", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="SOMA experiment path to write")
    p.add_argument("--cells", type=int, default=SplatConfig.n_cells)
    p.add_argument("--genes", type=int, default=SplatConfig.n_genes)
    p.add_argument("--groups", type=int, default=SplatConfig.n_groups)
    p.add_argument("--batches", type=int, default=SplatConfig.n_batches)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if min(a.cells, a.genes, a.groups, a.batches) < 1:
        p.exit(2, "error: --cells, --genes, --groups and --batches must be positive\n")
    cfg = SplatConfig(
        n_cells=a.cells, n_genes=a.genes, n_groups=a.groups, n_batches=a.batches, seed=a.seed
    )
    uri = write_splat_experiment(a.out, cfg, overwrite=a.overwrite)
    print(f"wrote a Splat simulation ({cfg.n_cells} cells x {cfg.n_genes} genes) to {uri}")
    return 0


if __name__ == "__main__":
    from data_ingest.cli import run_main

    run_main(main)

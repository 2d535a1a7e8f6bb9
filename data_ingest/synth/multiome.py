"""Synthetic CITE-seq: RNA from the synthetic census generator plus a panel of surface proteins (ADTs).

The RNA part is drawn from the same planted truth as a synthetic census (`data_ingest.synth.CensusTruth`, built
from the census's config, so gene names, cell-type programs and dataset effects match the census a model was
pretrained on). Each protein `PROT_<gene>` targets one gene of a cell-type marker set or of a co-expression
module, and follows that gene's program: it is up in the types where its gene is a marker (or its module is
active). Proteins have their own count model, as antibody-derived tags do: a per-cell protein library size,
per-protein abundance, a per-dataset protein effect, an ambient background share spread over all proteins, and
negative-binomial noise with low dispersion (proteins are dense: nearly every protein is counted in every cell).

The result is one AnnData: RNA genes then proteins as columns, var `feature_type` (10x naming: `Gene Expression`
/ `Antibody Capture`), obs `cell_type` and `dataset_id` (the batch); written as `.h5ad`.

    python -m data_ingest.synth.multiome --ground-truth outputs/synth/census.ground_truth.json \
        --out outputs/synth/multiome.h5ad --cells 2000 --batches 4
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.synth.census import CensusSynthConfig, CensusTruth, _sample_block

PROTEIN_PREFIX = "PROT_"
"""Protein feature names are this prefix + the target gene's name (their own vocabulary tokens)."""
VAR_FEATURE_TYPE = "feature_type"
"""var column telling RNA genes from proteins (10x Genomics' `feature_types` naming)."""
FEATURE_RNA = "Gene Expression"
FEATURE_PROTEIN = "Antibody Capture"
FEATURE_MODALITY = {FEATURE_RNA: keys.MODALITY_RNA, FEATURE_PROTEIN: keys.MODALITY_PROTEIN}
"""Modality id (data_ingest.keys.MODALITY_*) of each feature type."""


@dataclass
class MultiomeSynthConfig:
    """Cells, batches and the protein panel of a synthetic CITE-seq data set."""

    n_cells: int = 2000
    """Cells, split evenly over the batches."""
    n_batches: int = 4
    """Census datasets the cells are drawn from (the first n); each is a batch."""
    n_proteins: int = 30
    """Proteins in the panel: one marker gene per cell type first, then one gene per co-expression module."""
    marker_fold: float = 6.0
    """Protein fold change in the cell types where its target gene is a marker."""
    module_fold: float = 3.0
    """Protein fold change in the cell types where its target gene's module is active."""
    abundance_sd: float = 0.7
    """SD of the per-protein log abundance (antibody efficiency and copy number)."""
    mean_protein_counts: float = 2000.0
    """Mean protein (ADT) counts per cell."""
    background_fraction: float = 0.25
    """Share of each cell's protein counts that is ambient background, spread evenly over the proteins."""
    protein_batch_sd: float = 0.3
    """SD of the per-dataset, per-protein log scale (protein batch effect, on top of the RNA one)."""
    dispersion: float = 0.1
    """Negative-binomial dispersion of protein counts (variance = mu + dispersion * mu^2)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_cells < self.n_batches:
            raise ValueError(f"n_cells={self.n_cells} is fewer than n_batches={self.n_batches}")
        if self.n_proteins < 1:
            raise ValueError(f"n_proteins={self.n_proteins}; the panel needs at least one protein")


def census_config_from_truth(path: str | Path) -> CensusSynthConfig:
    """The generator config recorded in a synthetic census's `<census>.ground_truth.json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no ground truth at {path}; pass the `<census>.ground_truth.json` that "
            "`python -m data_ingest.synth` wrote next to the census"
        )
    cfg = json.loads(path.read_text()).get("config")
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{path} has no `config` object; it is not a synthetic-census ground truth"
        )
    return CensusSynthConfig(**cfg)


def protein_targets(truth: CensusTruth, n_proteins: int) -> np.ndarray:
    """Target gene index of each protein: one marker per cell type (round-robin over the types' markers),
    then the heaviest-weighted gene of each module, alternating until the panel is full."""
    marker_first = [int(m[0]) for m in truth.markers]
    module_top = [
        int(m[np.argmax(w)]) for m, w in zip(truth.modules, truth.module_weights, strict=True)
    ]
    order, seen = [], set()
    rank = 0
    while len(order) < n_proteins:
        pool = (
            marker_first + module_top
            if rank == 0
            else [int(m[rank]) for m in truth.markers if rank < len(m)]
        )
        if not pool:
            break
        for g in pool:
            if g not in seen and len(order) < n_proteins:
                order.append(g)
                seen.add(g)
        rank += 1
    if len(order) < n_proteins:
        raise ValueError(
            f"n_proteins={n_proteins} exceeds the {len(order)} marker and module genes available"
        )
    return np.asarray(order)


def protein_log_folds(
    truth: CensusTruth, targets: np.ndarray, cfg: MultiomeSynthConfig
) -> np.ndarray:
    """(n_cell_types, n_proteins) log fold of each protein in each type, from its target gene's programs."""
    n_types = len(truth.type_names)
    folds = np.zeros((n_types, len(targets)))
    module_of = {int(g): k for k, genes in enumerate(truth.modules) for g in genes}
    for t in range(n_types):
        markers = set(truth.markers[t].tolist())
        active = set(truth.type_modules[t].tolist())
        for j, g in enumerate(targets):
            if int(g) in markers:
                folds[t, j] += np.log(cfg.marker_fold)
            if module_of.get(int(g)) in active:
                folds[t, j] += np.log(cfg.module_fold)
    return folds


def make_multiome(cfg: MultiomeSynthConfig, census: CensusSynthConfig) -> ad.AnnData:
    """RNA + protein counts (cells x (genes + proteins), CSR float32) with obs `cell_type`, `dataset_id`."""
    truth = CensusTruth(census)
    if cfg.n_batches > len(truth.datasets):
        raise ValueError(
            f"n_batches={cfg.n_batches} but the census has {len(truth.datasets)} datasets; use fewer"
        )
    rng = np.random.default_rng([cfg.seed, 6])
    targets = protein_targets(truth, cfg.n_proteins)
    folds = protein_log_folds(truth, targets, cfg)  # (types, P)
    n_prot = len(targets)
    log_abundance = rng.normal(0.0, cfg.abundance_sd, n_prot)
    batch_effect = rng.normal(0.0, cfg.protein_batch_sd, (cfg.n_batches, n_prot))
    batch_capture = rng.lognormal(0.0, 0.3, cfg.n_batches)

    per_batch = np.full(cfg.n_batches, cfg.n_cells // cfg.n_batches)
    per_batch[: cfg.n_cells % cfg.n_batches] += 1
    rna_blocks, prot_blocks, obs_rows = [], [], []
    for d, n in enumerate(per_batch):
        rna, ctype = _sample_block(truth, d, int(n), rng)  # (n, G) CSR, (n,)
        lib = rng.lognormal(np.log(cfg.mean_protein_counts), 0.4, n) * batch_capture[d]  # (n,)
        logits = log_abundance[None, :] + folds[ctype] + batch_effect[d][None, :]  # (n, P)
        prop = np.exp(logits - logits.max(1, keepdims=True))
        prop /= prop.sum(1, keepdims=True)
        mu = lib[:, None] * (
            (1 - cfg.background_fraction) * prop + cfg.background_fraction / n_prot
        )
        shape = 1.0 / cfg.dispersion
        prot = rng.poisson(rng.gamma(shape, mu / shape)).astype(np.float32)  # (n, P)
        rna_blocks.append(rna)
        prot_blocks.append(sp.csr_matrix(prot))
        info = truth.datasets[d]
        for i, t in enumerate(ctype):
            obs_rows.append(
                (f"{info['dataset_id']}:cite{i}", truth.type_names[t], info["dataset_id"])
            )
    X = sp.hstack([sp.vstack(rna_blocks), sp.vstack(prot_blocks)], format="csr", dtype=np.float32)
    gene_names = list(truth.gene_names)
    prot_names = [PROTEIN_PREFIX + gene_names[g] for g in targets]
    obs = pd.DataFrame(
        obs_rows, columns=[keys.OBS_ID, keys.OBS_CELL_TYPE, keys.OBS_DATASET]
    ).set_index(keys.OBS_ID, drop=False)
    obs.index.name = None
    var = pd.DataFrame(
        {
            keys.VAR_GENE_NAME: gene_names + prot_names,
            VAR_FEATURE_TYPE: [FEATURE_RNA] * len(gene_names) + [FEATURE_PROTEIN] * n_prot,
        },
        index=gene_names + prot_names,
    )
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["protein_targets"] = {
        p: gene_names[g] for p, g in zip(prot_names, targets, strict=True)
    }
    adata.uns["multiome_config"] = json.dumps(dataclasses.asdict(cfg))
    return adata


def modality_of_features(var: pd.DataFrame) -> np.ndarray:
    """Modality id per feature column: from var `feature_type` when present, else protein = `PROT_` names."""
    if VAR_FEATURE_TYPE in var:
        types = var[VAR_FEATURE_TYPE].astype(str)
        unknown = sorted(set(types) - set(FEATURE_MODALITY))
        if unknown:
            raise ValueError(
                f"var[{VAR_FEATURE_TYPE!r}] has unknown feature types {unknown}; "
                f"use {sorted(FEATURE_MODALITY)}"
            )
        return types.map(FEATURE_MODALITY).to_numpy().astype(np.int8)
    names = var.index.astype(str)
    return np.where(
        names.str.startswith(PROTEIN_PREFIX), keys.MODALITY_PROTEIN, keys.MODALITY_RNA
    ).astype(np.int8)


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write `adata` to a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.h5ad")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m data_ingest.synth.multiome",
        description="Write a synthetic CITE-seq (RNA + protein) .h5ad from a synthetic census's planted truth.",
    )
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument(
        "--ground-truth",
        help="<census>.ground_truth.json of the census the model was pretrained on (default: the "
        "generator's default census config)",
    )
    p.add_argument("--cells", type=int, default=MultiomeSynthConfig.n_cells)
    p.add_argument("--batches", type=int, default=MultiomeSynthConfig.n_batches)
    p.add_argument("--proteins", type=int, default=MultiomeSynthConfig.n_proteins)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    census = census_config_from_truth(a.ground_truth) if a.ground_truth else CensusSynthConfig()
    cfg = MultiomeSynthConfig(
        n_cells=a.cells, n_batches=a.batches, n_proteins=a.proteins, seed=a.seed
    )
    adata = make_multiome(cfg, census)
    out = write_h5ad_atomic(adata, a.out)
    n_prot = int((modality_of_features(adata.var) == keys.MODALITY_PROTEIN).sum())
    print(
        f"wrote {adata.n_obs} cells x {adata.n_vars - n_prot} genes + {n_prot} proteins "
        f"({adata.obs[keys.OBS_DATASET].nunique()} batches, {adata.obs[keys.OBS_CELL_TYPE].nunique()} "
        f"cell types) to {out}"
    )
    return 0


if __name__ == "__main__":
    from data_ingest.cli import run_main

    run_main(main)

"""A synthetic census: CELLxGENE Census layout (census_info + census_data/<organism>), tissues, cell types,
datasets with batch effects and count-like values, and the planted truth (`CensusTruth`, written next to
the census as `<census>.ground_truth.json`): `python -m data_ingest.synth`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.atomic import atomic_directory, write_text_atomic
from data_ingest.progress import progress as progress_bar

TISSUES = (
    "blood", "lung", "brain", "liver", "kidney", "heart", "intestine", "skin", "breast", "spleen",
    "lymph node", "bone marrow", "pancreas", "eye", "muscle", "adipose tissue",
)  # fmt: skip
ASSAYS = ("10x 3' v3", "10x 3' v2", "10x 5' v2", "10x 5' v1", "Smart-seq2", "Drop-seq")
DISEASES = ("normal", "COVID-19", "lung adenocarcinoma", "type 2 diabetes mellitus")


@dataclass
class CensusSynthConfig:
    """A synthetic census: datasets x tissues x cell types with planted programs, written in blocks."""

    n_cells: int = 100_000
    """Cells in the experiment."""
    n_genes: int = 20_000
    """Genes (var rows)."""
    n_datasets: int = 40
    """Datasets (the census's batches); rows are grouped by dataset."""
    n_tissues: int = 12
    """Distinct `tissue_general` values (at most len(TISSUES))."""
    n_cell_types: int = 60
    """Cell types; each tissue has its own subset, a dataset draws from its tissue's types."""
    types_per_tissue: int = 10
    """Cell types present in each tissue (at most n_cell_types)."""
    markers_per_type: int = 20
    """Marker genes per cell type (from the well-expressed half of genes)."""
    marker_fold: float = 8.0
    """Fold change of a marker gene in its type."""
    n_modules: int = 30
    """Co-expression modules: gene sets sharing a per-cell activity (the planted gene-gene network)."""
    genes_per_module: int = 15
    """Genes in each module."""
    modules_per_type: int = 3
    """Modules active in each cell type."""
    module_fraction: float = 0.08
    """Share of an active cell's reads that come from its modules (scaled by the module's activity)."""
    batch_sd: float = 0.3
    """SD of the per-dataset, per-gene log scale (batch effect)."""
    mean_library_size: float = 3000.0
    """Mean total counts per cell (about 1 000 - 1 500 detected genes at 20k genes)."""
    base_sigma: float = 2.0
    """SD of log baseline gene expression (heavier tail = sparser cells)."""
    non_primary_fraction: float = 0.1
    """Share of datasets whose cells are marked `is_primary_data == False` (duplicates in the census)."""
    organism: str = "homo_sapiens"
    """Experiment name under `census_data/`."""
    block_cells: int = 8192
    """Cells generated and written per block (bounds memory: about block_cells x 30 KB)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_tissues > len(TISSUES):
            raise ValueError(f"n_tissues={self.n_tissues}; at most {len(TISSUES)} are named")
        expressed = self.n_genes // 2
        need = self.markers_per_type + self.n_modules * self.genes_per_module
        if need > expressed:
            raise ValueError(
                f"n_genes={self.n_genes} is too small for {self.markers_per_type} markers per type "
                f"plus {self.n_modules} x {self.genes_per_module} module genes; add genes"
            )
        if self.n_cells < self.n_datasets:
            raise ValueError(f"n_cells={self.n_cells} is fewer than n_datasets={self.n_datasets}")


class CensusTruth:
    """The planted structure of a synthetic census (what evaluations compare a model against)."""

    def __init__(self, cfg: CensusSynthConfig):
        rng = np.random.default_rng([cfg.seed, 1])
        g = cfg.n_genes
        self.cfg = cfg
        self.gene_names = [f"SYNG{i:05d}" for i in range(g)]
        self.gene_ids = [f"ENSSYN{i:011d}" for i in range(g)]
        log_base = rng.normal(0.0, cfg.base_sigma, g)
        self.log_base = log_base - np.log(np.exp(log_base).sum())
        expressed = np.argsort(log_base)[g // 2 :]
        module_genes = rng.choice(expressed, (cfg.n_modules, cfg.genes_per_module), replace=False)
        self.modules = module_genes
        self.module_weights = rng.dirichlet(np.full(cfg.genes_per_module, 5.0), cfg.n_modules)
        free = np.setdiff1d(expressed, module_genes.ravel())
        self.markers = np.stack(
            [rng.choice(free, cfg.markers_per_type, replace=False) for _ in range(cfg.n_cell_types)]
        )
        self.type_modules = np.stack(
            [
                rng.choice(cfg.n_modules, cfg.modules_per_type, replace=False)
                for _ in range(cfg.n_cell_types)
            ]
        )
        self.type_names = [f"celltype_{t:03d}" for t in range(cfg.n_cell_types)]
        self.tissue_types = [
            np.sort(
                rng.choice(
                    cfg.n_cell_types, min(cfg.types_per_tissue, cfg.n_cell_types), replace=False
                )
            )
            for _ in range(cfg.n_tissues)
        ]
        sizes = rng.lognormal(0.0, 0.8, cfg.n_datasets)
        counts = np.maximum(1, np.floor(sizes / sizes.sum() * cfg.n_cells)).astype(np.int64)
        counts[np.argmax(counts)] += cfg.n_cells - counts.sum()
        self.datasets = []
        for d in range(cfg.n_datasets):
            tissue = int(rng.integers(cfg.n_tissues))
            types = self.tissue_types[tissue]
            self.datasets.append(
                {
                    "dataset_id": f"synth-dataset-{d:04d}",
                    "n_cells": int(counts[d]),
                    "tissue_general": TISSUES[tissue],
                    "assay": ASSAYS[int(rng.integers(len(ASSAYS)))],
                    "disease": DISEASES[0] if rng.random() < 0.7 else DISEASES[1 + d % 3],
                    "is_primary_data": bool(rng.random() >= cfg.non_primary_fraction),
                    "cell_types": [int(t) for t in types],
                    "type_mix": rng.dirichlet(np.ones(len(types))).tolist(),
                    "library_scale": float(rng.lognormal(0.0, 0.3)),
                }
            )
        self.batch_scale = rng.normal(0.0, cfg.batch_sd, (cfg.n_datasets, g)).astype(np.float32)

    def to_json(self) -> dict:
        names = np.asarray(self.gene_names)
        edges = sorted(
            {
                (str(a), str(b))
                for m in self.modules
                for i, a in enumerate(names[np.sort(m)])
                for b in names[np.sort(m)][i + 1 :]
            }
        )
        return {
            "config": dataclasses.asdict(self.cfg),
            "marker_genes": {
                self.type_names[t]: names[np.sort(m)].tolist() for t, m in enumerate(self.markers)
            },
            "modules": [
                {
                    "genes": names[m].tolist(),
                    "weights": w.round(6).tolist(),
                    "active_in": [
                        self.type_names[t]
                        for t in range(len(self.type_names))
                        if k in self.type_modules[t]
                    ],
                }
                for k, (m, w) in enumerate(zip(self.modules, self.module_weights, strict=True))
            ],
            "coexpression_edges": edges,
            "datasets": [
                {
                    **{k: v for k, v in d.items() if k not in ("cell_types", "type_mix")},
                    "cell_types": [self.type_names[t] for t in d["cell_types"]],
                    "type_mix": [round(x, 6) for x in d["type_mix"]],
                }
                for d in self.datasets
            ],
        }


def _sample_block(
    truth: CensusTruth, d: int, n: int, rng: np.random.Generator
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts (n x genes, CSR) and cell-type indices of `n` cells of dataset `d`."""
    cfg, info = truth.cfg, truth.datasets[d]
    g = cfg.n_genes
    types = np.asarray(info["cell_types"])
    # Cells are generated sorted by type (each type's reads are one slice) and permuted at the end.
    ctype = np.sort(types[rng.choice(len(types), n, p=info["type_mix"])])
    lib = rng.lognormal(np.log(cfg.mean_library_size), 0.5, n) * info["library_scale"]
    act = rng.gamma(2.0, 0.5, (n, cfg.modules_per_type))  # module activity, mean 1
    mod_reads = rng.poisson(lib[:, None] * cfg.module_fraction * act / cfg.modules_per_type)
    base_reads = rng.poisson(lib).astype(np.int64)
    # Base reads: sorted uniforms per cell (normalized cumulative exponentials) through the cell type's CDF,
    # so gene indices come out sorted within each cell and duplicates are runs (no sort needed).
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(base_reads, out=indptr[1:])
    cell_of_read = np.repeat(np.arange(n), base_reads)
    ext = indptr[1:] + np.arange(n)  # position of each cell's extra (normalizing) exponential
    cs = np.cumsum(rng.exponential(size=int(indptr[-1]) + n))
    before = np.concatenate([[0.0], cs[ext[:-1]]])
    scale = 1.0 / (cs[ext] - before)
    keep = np.ones(len(cs), bool)
    keep[ext] = False
    u = cs[keep]
    u -= np.repeat(before, base_reads)
    u *= np.repeat(scale, base_reads)
    genes = np.empty(len(u), np.int64)
    bounds = np.searchsorted(ctype, np.unique(ctype), side="left").tolist() + [n]
    logits0 = truth.log_base + truth.batch_scale[d].astype(np.float64)
    for i, t in enumerate(np.unique(ctype)):
        logits = logits0.copy()
        logits[truth.markers[t]] += np.log(cfg.marker_fold)
        p = np.exp(logits - logits.max())
        cdf = np.cumsum(p / p.sum())
        lo, hi = indptr[bounds[i]], indptr[bounds[i + 1]]
        genes[lo:hi] = np.searchsorted(cdf, u[lo:hi])
    np.minimum(genes, g - 1, out=genes)
    key = cell_of_read * g + genes
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else key
    counts = np.diff(np.concatenate([starts, [len(key)]]))
    base = sp.csr_matrix(
        (counts.astype(np.float32), (cell_of_read[starts], genes[starts])), shape=(n, g)
    )
    # Module reads: each active module's count spread over its genes by the module's weights.
    rows, cols = [], []
    for j in range(cfg.modules_per_type):
        mods = truth.type_modules[ctype, j]
        reps = mod_reads[:, j]
        cell = np.repeat(np.arange(n), reps)
        m = mods[cell]
        cdfs = np.cumsum(truth.module_weights, axis=1)[m]
        k = (rng.random(len(cell))[:, None] > cdfs).sum(1)
        rows.append(cell)
        cols.append(truth.modules[m, np.minimum(k, cfg.genes_per_module - 1)])
    r, c = np.concatenate(rows), np.concatenate(cols)
    module = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, g))
    X = (base + module).tocsr()
    X.sum_duplicates()
    perm = rng.permutation(n)
    X = X[perm]
    X.sort_indices()
    return X, ctype[perm]


def sample_census(cfg: CensusSynthConfig) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The cells of a synthetic census in memory, without SOMA: (counts CSR, cell-type index, dataset
    index), rows grouped by dataset. Same truth and distribution as `write_synthetic_census` (not the same
    random draws); for single-process experiments (`python -m jobs.bench lab`)."""
    truth = CensusTruth(cfg)
    rng = np.random.default_rng([cfg.seed, 2])
    blocks, types, datasets = [], [], []
    for d, info in enumerate(truth.datasets):
        X, ctype = _sample_block(truth, d, info["n_cells"], rng)
        blocks.append(X)
        types.append(ctype)
        datasets.append(np.full(len(ctype), d))
    return sp.vstack(blocks).tocsr(), np.concatenate(types), np.concatenate(datasets)


def write_synthetic_census(
    uri: str | Path, cfg: CensusSynthConfig, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write a census-layout SOMA collection at `uri` (experiment `census_data/<organism>`, counts in
    `ms["RNA"].X["raw"]`) block by block, and its ground truth to `<uri>.ground_truth.json`.

    Written under a temporary sibling and renamed into place; memory is bounded by `cfg.block_cells`.
    """
    import tiledbsoma

    uri = Path(uri).resolve()
    if uri.exists() and not overwrite:
        raise FileExistsError(f"{uri} exists; pass --overwrite or another --out")
    truth = CensusTruth(cfg)
    g = cfg.n_genes
    obs_schema = pa.schema(
        [(keys.SOMA_JOINID, pa.int64())]
        + [
            (c, pa.large_string())
            for c in (
                keys.OBS_ID,
                keys.OBS_DATASET,
                keys.OBS_CELL_TYPE,
                keys.OBS_CELL_TYPE_ID,
                keys.OBS_TISSUE,
                keys.OBS_TISSUE_GENERAL,
                keys.OBS_ASSAY,
                keys.OBS_DISEASE,
                keys.OBS_SEX,
                keys.OBS_DONOR,
                keys.OBS_SUSPENSION,
            )
        ]
        + [
            (keys.OBS_IS_PRIMARY, pa.bool_()),
            (keys.OBS_NNZ, pa.int64()),
            (keys.OBS_RAW_SUM, pa.float64()),
        ]
    )
    var_nnz = np.zeros(g, np.int64)
    rng = np.random.default_rng([cfg.seed, 2])
    with atomic_directory(uri, create=False) as tmp:
        with tiledbsoma.Collection.create(str(tmp)) as census:
            info = census.add_new_collection(keys.CENSUS_INFO)
            data = census.add_new_collection(keys.CENSUS_DATA)
            exp = data.add_new_collection(cfg.organism, tiledbsoma.Experiment)
            obs = exp.add_new_dataframe("obs", schema=obs_schema, domain=[(0, cfg.n_cells - 1)])
            ms = exp.add_new_collection("ms")
            rna = ms.add_new_collection(keys.MEASUREMENT_RNA, tiledbsoma.Measurement)
            X = rna.add_new_collection("X").add_new_sparse_ndarray(
                keys.RAW_LAYER,
                type=pa.float32(),
                shape=(cfg.n_cells, g),
                platform_config=keys.CENSUS_X_PLATFORM_CONFIG,
            )
            bar = progress_bar(
                total=cfg.n_cells, unit="cells", enabled=progress, desc="synth census"
            )
            row0 = 0
            for d, dinfo in enumerate(truth.datasets):
                left = dinfo["n_cells"]
                while left:
                    n = min(left, cfg.block_cells)
                    Xb, ctype = _sample_block(truth, d, n, rng)
                    coo = Xb.tocoo()
                    X.write(
                        pa.Table.from_pydict(
                            {
                                "soma_dim_0": pa.array(coo.row.astype(np.int64) + row0),
                                "soma_dim_1": pa.array(coo.col.astype(np.int64)),
                                "soma_data": pa.array(coo.data.astype(np.float32)),
                            }
                        )
                    )
                    var_nnz += np.bincount(coo.col, minlength=g)
                    nnz = np.diff(Xb.indptr)
                    donor = rng.integers(0, 8, n)
                    cols = {
                        keys.SOMA_JOINID: np.arange(row0, row0 + n, dtype=np.int64),
                        keys.OBS_ID: [f"{dinfo['dataset_id']}:{row0 + i}" for i in range(n)],
                        keys.OBS_DATASET: [dinfo["dataset_id"]] * n,
                        keys.OBS_CELL_TYPE: [truth.type_names[t] for t in ctype],
                        keys.OBS_CELL_TYPE_ID: [f"CL:9{t:06d}" for t in ctype],
                        keys.OBS_TISSUE: [dinfo["tissue_general"]] * n,
                        keys.OBS_TISSUE_GENERAL: [dinfo["tissue_general"]] * n,
                        keys.OBS_ASSAY: [dinfo["assay"]] * n,
                        keys.OBS_DISEASE: [dinfo["disease"]] * n,
                        keys.OBS_SEX: np.where(donor % 2 == 0, "female", "male").tolist(),
                        keys.OBS_DONOR: [f"{dinfo['dataset_id']}-donor{k}" for k in donor],
                        keys.OBS_SUSPENSION: ["cell"] * n,
                        keys.OBS_IS_PRIMARY: np.full(n, dinfo["is_primary_data"]),
                        keys.OBS_NNZ: nnz.astype(np.int64),
                        keys.OBS_RAW_SUM: np.asarray(Xb.sum(1)).ravel().astype(np.float64),
                    }
                    obs.write(pa.Table.from_pydict(cols, schema=obs_schema))
                    row0 += n
                    left -= n
                    bar.update(n)
            bar.close()
            var = pa.Table.from_pydict(
                {
                    keys.SOMA_JOINID: np.arange(g, dtype=np.int64),
                    keys.VAR_ID: truth.gene_names,
                    keys.VAR_GENE_ID: truth.gene_ids,
                    keys.VAR_GENE_NAME: truth.gene_names,
                    "feature_length": np.full(g, 1000, np.int64),
                    keys.VAR_NNZ: var_nnz,
                }
            )
            rna.add_new_dataframe("var", schema=var.schema, domain=[(0, g - 1)]).write(var)
            summary = pa.Table.from_pydict(
                {
                    keys.SOMA_JOINID: np.arange(3, dtype=np.int64),
                    "label": ["census_schema_version", "census_build_date", "total_cell_count"],
                    "value": ["2.1.0", "synthetic", str(cfg.n_cells)],
                }
            )
            info.add_new_dataframe(
                keys.CENSUS_SUMMARY, schema=summary.schema, domain=[(0, 2)]
            ).write(summary)
            ds_tab = pa.Table.from_pydict(
                {
                    keys.SOMA_JOINID: np.arange(len(truth.datasets), dtype=np.int64),
                    keys.OBS_DATASET: [d["dataset_id"] for d in truth.datasets],
                    "dataset_title": [f"synthetic {d['tissue_general']}" for d in truth.datasets],
                    "dataset_total_cell_count": [d["n_cells"] for d in truth.datasets],
                }
            )
            info.add_new_dataframe(
                keys.CENSUS_DATASETS, schema=ds_tab.schema, domain=[(0, len(truth.datasets) - 1)]
            ).write(ds_tab)
        truth_path = Path(str(uri) + GROUND_TRUTH_SUFFIX)
        write_text_atomic(truth_path, json.dumps(truth.to_json()))
    return uri


GROUND_TRUTH_SUFFIX = ".ground_truth.json"


def experiment_uri(census_uri: str | Path, organism: str = "homo_sapiens") -> str:
    """The experiment inside a census-layout collection."""
    return f"{census_uri}/census_data/{organism}"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    p = argparse.ArgumentParser(
        prog="python -m data_ingest.synth",
        description="Write a synthetic census (CELLxGENE Census layout) with planted ground truth.",
    )
    p.add_argument("--out", required=True, help="census collection URI (a local path)")
    p.add_argument("--cells", type=int, default=CensusSynthConfig.n_cells)
    p.add_argument("--genes", type=int, default=CensusSynthConfig.n_genes)
    p.add_argument("--datasets", type=int, default=CensusSynthConfig.n_datasets)
    p.add_argument("--tissues", type=int, default=CensusSynthConfig.n_tissues)
    p.add_argument("--cell-types", type=int, default=CensusSynthConfig.n_cell_types)
    p.add_argument("--types-per-tissue", type=int, default=CensusSynthConfig.types_per_tissue)
    p.add_argument("--library-size", type=float, default=CensusSynthConfig.mean_library_size)
    p.add_argument("--block-cells", type=int, default=CensusSynthConfig.block_cells)
    p.add_argument("--organism", default=CensusSynthConfig.organism)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = CensusSynthConfig(
        n_cells=a.cells,
        n_genes=a.genes,
        n_datasets=a.datasets,
        n_tissues=a.tissues,
        n_cell_types=a.cell_types,
        types_per_tissue=a.types_per_tissue,
        mean_library_size=a.library_size,
        block_cells=a.block_cells,
        organism=a.organism,
        seed=a.seed,
    )
    t0 = time.perf_counter()
    uri = write_synthetic_census(a.out, cfg, overwrite=a.overwrite, progress=not a.no_progress)
    print(
        f"wrote {cfg.n_cells} cells x {cfg.n_genes} genes to {experiment_uri(uri, cfg.organism)} "
        f"in {time.perf_counter() - t0:.1f}s; ground truth in {uri}{GROUND_TRUTH_SUFFIX}"
    )
    return 0

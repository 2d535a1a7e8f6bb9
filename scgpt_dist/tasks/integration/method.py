"""Batch-integration evaluation: scib metrics of a cell embedding, the PCA / Harmony / scVI baselines, and
UMAP plots.

Metrics (computed with `scib-metrics`, on an exact kNN graph so results are deterministic):

| metric | what | better |
| --- | --- | --- |
| `nmi`, `ari` | agreement of a clustering of the embedding with the cell types (Leiden at the resolution that maximises NMI, as scib's "optimised clustering"; or k-means with k = number of types) | higher |
| `asw_celltype` | cell-type silhouette, rescaled to [0, 1] | higher |
| `avg_bio` | mean(nmi, ari, asw_celltype): biological conservation (scGPT paper's AvgBIO) | higher |
| `asw_batch` | 1 - |batch silhouette| within each cell type, averaged (scib) | higher (mixed) |
| `graph_conn` | share of each cell type's cells in its largest kNN-graph component, averaged | higher |
| `avg_batch` | mean(asw_batch, graph_conn): batch removal (AvgBATCH) | higher |
| `overall` | 0.6 avg_bio + 0.4 avg_batch (scib's weighting) | higher |

Baselines: `pca_baseline` (library-size normalisation, log1p, HVGs, scaling, PCA), `harmony_baseline`
(harmonypy on that PCA), `scvi_baseline` (scvi-tools SCVI on the HVG counts, a few epochs on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scgpt_dist.preprocess import hvg_index, log_normalize

log = logging.getLogger(__name__)

METRICS = (
    "nmi",
    "ari",
    "asw_celltype",
    "avg_bio",
    "asw_batch",
    "graph_conn",
    "avg_batch",
    "overall",
)
"""Metric names returned by `scib_scores`, in report order."""
BIO_WEIGHT = 0.6
"""scib's weight of biological conservation in the overall score (batch removal gets 1 - this)."""
CLUSTERINGS = ("leiden", "kmeans")


@dataclass
class ScibConfig:
    """How the scib metrics are computed."""

    n_neighbors: int = 15
    """kNN graph size for clustering and graph connectivity (scib uses 15)."""
    clustering: str = "leiden"
    """`leiden` (igraph Leiden, resolution optimised for NMI over 0.1..2.0, as scib) or `kmeans`
    (k = number of cell types; what scib-metrics' Benchmarker uses by default)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering={self.clustering!r}; choose one of {CLUSTERINGS}")
        if self.n_neighbors < 2:
            raise ValueError(f"n_neighbors={self.n_neighbors}; use at least 2")


def knn_graph(X: np.ndarray, n_neighbors: int):
    """Exact euclidean kNN (each cell's first neighbour is itself) as scib-metrics' NeighborsResults."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors + 1, X.shape[0])
    dist, idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)  # (N, k) each
    return NeighborsResults(indices=idx.astype(np.int64), distances=dist.astype(np.float32))


def scib_scores(
    X: np.ndarray, labels: np.ndarray, batches: np.ndarray, cfg: ScibConfig | None = None
) -> dict[str, float]:
    """The scib metrics (see the module docstring) of embedding X (N, d) for cell types `labels` and
    batches `batches` (N,) each."""
    import scib_metrics

    cfg = cfg or ScibConfig()
    X = np.asarray(X, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    batches = np.asarray(batches).astype(str)
    if not (X.ndim == 2 and X.shape[0] == len(labels) == len(batches)):
        raise ValueError(
            f"embedding {X.shape}, {len(labels)} labels and {len(batches)} batches must have one row "
            "per cell"
        )
    if not np.isfinite(X).all():
        raise ValueError("the embedding has NaN or infinite values; check the model or baseline")
    if len(np.unique(labels)) < 2:
        raise ValueError("scib metrics need at least two cell types; pass the right --label-key")
    if len(np.unique(batches)) < 2:
        raise ValueError(
            "batch-integration metrics need at least two batches; pass --batch-key with the column "
            "that holds the batch (dataset) of each cell, or data with several batches"
        )
    label_codes = np.unique(labels, return_inverse=True)[1]
    batch_codes = np.unique(batches, return_inverse=True)[1]
    nn = knn_graph(X, cfg.n_neighbors)
    if cfg.clustering == "leiden":
        clus = scib_metrics.nmi_ari_cluster_labels_leiden(
            nn, label_codes, optimize_resolution=True, seed=cfg.seed
        )
    else:
        clus = scib_metrics.nmi_ari_cluster_labels_kmeans(X, label_codes)
    scores = {
        "nmi": float(clus["nmi"]),
        "ari": float(clus["ari"]),
        "asw_celltype": float(scib_metrics.silhouette_label(X, label_codes, rescale=True)),
        "asw_batch": float(
            scib_metrics.silhouette_batch(X, label_codes, batch_codes, rescale=True)
        ),
        "graph_conn": float(scib_metrics.graph_connectivity(nn, label_codes)),
    }
    scores["avg_bio"] = float(np.mean([scores["nmi"], scores["ari"], scores["asw_celltype"]]))
    scores["avg_batch"] = float(np.mean([scores["asw_batch"], scores["graph_conn"]]))
    scores["overall"] = BIO_WEIGHT * scores["avg_bio"] + (1 - BIO_WEIGHT) * scores["avg_batch"]
    return {k: scores[k] for k in METRICS}


# ------------------------------------------------------------------------------------------------ baselines


@dataclass
class BaselineConfig:
    """The PCA / Harmony / scVI baselines."""

    n_hvg: int = 2000
    """Highly variable genes kept (all genes when the data has fewer)."""
    n_pcs: int = 50
    """Principal components (PCA and Harmony)."""
    scvi_epochs: int = 20
    """scVI training epochs (scvi-tools' own default scales to ~400 for 20k cells; keep it small on CPU)."""
    scvi_latent: int = 10
    """scVI latent dimensions (scvi-tools default)."""
    scvi_batch_size: int = 128
    harmony_max_iter: int = 10
    """Harmony rounds (harmonypy default)."""
    seed: int = 0


def _dense_log(X) -> np.ndarray:
    return log_normalize(X).toarray().astype(np.float32)


def pca_of(logX: np.ndarray, n_pcs: int, seed: int = 0) -> np.ndarray:
    """Scaled (z-scored, clipped at 10 as scanpy) PCA of log-normalised values: (N, n_pcs)."""
    from sklearn.decomposition import PCA

    Z = (logX - logX.mean(0)) / np.maximum(logX.std(0), 1e-8)
    Z = np.clip(Z, -10, 10)
    n = min(n_pcs, Z.shape[0] - 1, Z.shape[1])
    return PCA(n_components=n, random_state=seed).fit_transform(Z).astype(np.float32)


def pca_baseline(counts, cfg: BaselineConfig | None = None) -> np.ndarray:
    """HVG + log-normalised PCA of counts (N, G): (N, n_pcs)."""
    cfg = cfg or BaselineConfig()
    logX = _dense_log(counts)
    return pca_of(logX[:, hvg_index(logX, cfg.n_hvg)], cfg.n_pcs, cfg.seed)


def harmony_baseline(
    pcs: np.ndarray, batches: np.ndarray, cfg: BaselineConfig | None = None
) -> np.ndarray:
    """Harmony (harmonypy) correction of a PCA (N, d) for `batches` (N,): (N, d)."""
    import harmonypy
    import pandas as pd

    cfg = cfg or BaselineConfig()
    meta = pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    ho = harmonypy.run_harmony(
        np.asarray(pcs, dtype=np.float64),
        meta,
        ["batch"],
        max_iter_harmony=cfg.harmony_max_iter,
        random_state=cfg.seed,
        verbose=False,
    )
    Z = np.asarray(ho.Z_corr)
    return (Z if Z.shape[0] == len(meta) else Z.T).astype(np.float32)  # older harmonypy: (d, N)


def check_counts(counts, what: str = "scVI") -> None:
    """scVI's likelihood is for counts; warn (not fail) on non-integer values, as for log-normalised data."""
    data = counts.data if sp.issparse(counts) else np.asarray(counts)
    if data.size and not np.allclose(data, np.round(data)):
        log.warning(
            "%s expects raw counts but the data has non-integer values (e.g. log-normalised); "
            "its result is not a fair baseline on such data",
            what,
        )


def scvi_baseline(
    counts, batches: np.ndarray, cfg: BaselineConfig | None = None, hvg: np.ndarray | None = None
) -> np.ndarray:
    """scVI latent (N, scvi_latent) of counts (N, G) restricted to HVGs, with `batches` as batch key."""
    import pandas as pd
    import scvi

    cfg = cfg or BaselineConfig()
    X = sp.csr_matrix(counts, dtype=np.float32)
    check_counts(X)
    if hvg is None:
        hvg = hvg_index(_dense_log(X), cfg.n_hvg)
    adata = ad.AnnData(
        X=X[:, hvg].copy(), obs=pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    )
    adata.obs.index = adata.obs.index.astype(str)
    scvi.settings.seed = cfg.seed
    scvi.settings.dl_num_workers = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=cfg.scvi_latent)
    model.train(
        max_epochs=cfg.scvi_epochs,
        accelerator="cpu",
        devices=1,
        batch_size=cfg.scvi_batch_size,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
    )
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


def totalvi_baseline(
    rna_counts,
    protein_counts: np.ndarray,
    batches: np.ndarray,
    cfg: BaselineConfig | None = None,
    protein_names: list[str] | None = None,
) -> np.ndarray:
    """totalVI (scvi-tools) joint latent (N, scvi_latent) of RNA counts (N, G; HVGs kept) and protein
    counts (N, P)."""
    import pandas as pd
    import scvi

    cfg = cfg or BaselineConfig()
    X = sp.csr_matrix(rna_counts, dtype=np.float32)
    check_counts(X, "totalVI")
    hvg = hvg_index(_dense_log(X), cfg.n_hvg)
    n = X.shape[0]
    names = protein_names or [f"protein_{i}" for i in range(protein_counts.shape[1])]
    obs = pd.DataFrame({"batch": np.asarray(batches).astype(str)}, index=[str(i) for i in range(n)])
    adata = ad.AnnData(X=X[:, hvg].copy(), obs=obs)
    adata.obsm["protein_expression"] = pd.DataFrame(
        np.asarray(protein_counts, dtype=np.float32), index=obs.index, columns=names
    )
    scvi.settings.seed = cfg.seed
    scvi.settings.dl_num_workers = 0
    scvi.model.TOTALVI.setup_anndata(
        adata, batch_key="batch", protein_expression_obsm_key="protein_expression"
    )
    model = scvi.model.TOTALVI(adata, n_latent=cfg.scvi_latent)
    # totalVI's LR-on-plateau monitor needs a logger: keep scvi-tools' default (in-memory) one.
    model.train(
        max_epochs=cfg.scvi_epochs,
        accelerator="cpu",
        devices=1,
        batch_size=cfg.scvi_batch_size,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ plotting


def umap_coords(X: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP (umap-learn) of an embedding (N, d): (N, 2). Fixed seed, so single-threaded and repeatable."""
    import umap

    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(X) - 1), random_state=seed, n_jobs=1)
    return reducer.fit_transform(np.asarray(X, dtype=np.float32)).astype(np.float32)


def _scatter(ax, xy: np.ndarray, groups: np.ndarray, title: str, legend: bool) -> None:
    import matplotlib.pyplot as plt

    cats = sorted(set(groups.tolist()))
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    for i, c in enumerate(cats):
        sel = groups == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=3, color=cmap(i % cmap.N), label=str(c), linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend:
        ax.legend(
            fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
        )


def plot_umaps(fig, coords: dict[str, np.ndarray], labels: np.ndarray, batches: np.ndarray) -> None:
    """Draw one row per method into matplotlib Figure `fig`: its UMAP coloured by cell type (left) and by
    batch (right). `coords`: method -> (N, 2) from `umap_coords`."""
    labels = np.asarray(labels).astype(str)
    batches = np.asarray(batches).astype(str)
    n = len(coords)
    axes = fig.subplots(n, 2, squeeze=False)
    for row, (method, xy) in enumerate(coords.items()):
        _scatter(axes[row, 0], xy, labels, f"{method}: cell type", legend=row == 0)
        _scatter(axes[row, 1], xy, batches, f"{method}: batch", legend=row == 0)
    fig.tight_layout()


def save_umap_png(
    path, coords: dict[str, np.ndarray], labels: np.ndarray, batches: np.ndarray
) -> None:
    """`plot_umaps` into a PNG at `path` (written to a temporary name and renamed)."""
    import os
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = plt.figure(figsize=(9, 3.2 * len(coords)))
    plot_umaps(fig, coords, labels, batches)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)

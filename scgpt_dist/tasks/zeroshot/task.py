"""Zero-shot evaluation: the pretrained model's cell embeddings, without finetuning, next to HVG + PCA and scVI.

Scores: kNN cell-type annotation accuracy (5-fold cross-validated, k = 10) and, when the cells come from two or
more batches, the scib bio-conservation and batch-removal metrics (`scgpt_dist.tasks.integration`). Published work
(Kedzierska et al. 2023) found zero-shot scGPT embeddings often lose to HVG + PCA and scVI; the report says
which wins here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from scgpt_dist.evaluate import knn_accuracy
from scgpt_dist.inference import embed_anndata
from scgpt_dist.preprocess import hvg_index, is_count_matrix, log_normalize
from scgpt_dist.tasks.config import TaskConfig, arg
from scgpt_dist.tasks.integration import method as ig
from scgpt_dist.tasks.runner import TaskContext, load_cells
from scgpt_dist.train.checkpoint import load_consolidated

DESCRIPTION = "zero-shot cell embeddings: kNN annotation and scib metrics vs HVG+PCA and scVI"


@dataclass
class ZeroshotConfig(TaskConfig):
    """Zero-shot evaluation settings (besides the common ones)."""

    label_key: str = arg("cell_type", "obs column with the cell types")
    batch_key: str | None = arg(None, "obs column with the batch (default: dataset_id or batch)")
    k: int = arg(10, "neighbours of the kNN classifier")
    no_scvi: bool = arg(False, "skip the scVI baseline")
    scvi_epochs: int = arg(20)
    no_umap: bool = arg(False, "skip the UMAP figure")


def _batch_key(obs, requested: str | None) -> str | None:
    if requested:
        if requested not in obs:
            raise ValueError(f"--batch-key {requested!r} is not an obs column; have {list(obs)}")
        return requested
    return next((k for k in ("dataset_id", "batch") if k in obs), None)


def run(cfg: ZeroshotConfig, ctx: TaskContext) -> dict:

    adata = load_cells(cfg.data, cfg.obs_filter, cfg.max_cells, cfg.seed)
    if cfg.label_key not in adata.obs:
        raise ValueError(
            f"--label-key {cfg.label_key!r} is not an obs column; have {list(adata.obs)}"
        )
    labels = adata.obs[cfg.label_key].astype(str).to_numpy()
    bkey = _batch_key(adata.obs, cfg.batch_key)
    batches = adata.obs[bkey].astype(str).to_numpy() if bkey else np.full(adata.n_obs, "all")
    n_batches = len(np.unique(batches))

    embeddings: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    logX = log_normalize(adata.X).toarray().astype(np.float32)
    embeddings["hvg_pca50"] = ig.pca_of(logX[:, hvg_index(logX, 2000)], 50, cfg.seed)
    seconds["hvg_pca50"] = time.perf_counter() - t0
    notes = []
    if not cfg.no_scvi:
        if is_count_matrix(adata.X):
            t0 = time.perf_counter()
            scvi_cfg = ig.BaselineConfig(scvi_epochs=cfg.scvi_epochs, seed=cfg.seed)
            embeddings["scvi"] = ig.scvi_baseline(adata.X, batches, scvi_cfg)
            seconds["scvi"] = time.perf_counter() - t0
        else:
            notes.append("scVI skipped: the data are not counts (scVI's likelihood needs counts).")
    if cfg.checkpoint:
        t0 = time.perf_counter()
        loaded = load_consolidated(cfg.checkpoint)
        embeddings["scgpt_zeroshot"] = embed_anndata(loaded, adata)
        seconds["scgpt_zeroshot"] = time.perf_counter() - t0

    rows, metrics = [], {}
    for method, X in embeddings.items():
        row = {"method": method, "knn_accuracy": knn_accuracy(X, labels, k=cfg.k, seed=cfg.seed)}
        if n_batches >= 2:
            row.update(ig.scib_scores(X, labels, batches, ig.ScibConfig(seed=cfg.seed)))
        row["seconds"] = seconds[method]
        rows.append(row)
        metrics.update(
            {f"{method}/{k}": v for k, v in row.items() if k not in ("method", "seconds")}
        )
    key = "overall" if n_batches >= 2 else "knn_accuracy"
    rows.sort(key=lambda r: -r[key])

    rep = ctx.report
    rep.text(
        f"{adata.n_obs} cells, {len(np.unique(labels))} cell types (`{cfg.label_key}`), {n_batches} "
        f"batch(es) (`{bkey}`). kNN: {cfg.k} neighbours, 5-fold cross-validation on each embedding."
        + ("" if n_batches >= 2 else " One batch only: scib batch metrics are not computed.")
    )
    for note in notes:
        rep.text(note)
    rep.table(f"Zero-shot embeddings (sorted by {key})", rows)
    if "scgpt_zeroshot" in embeddings and rows[0]["method"] != "scgpt_zeroshot":
        ours = next(r for r in rows if r["method"] == "scgpt_zeroshot")
        rep.text(
            f"**{rows[0]['method']}** beats zero-shot scGPT on {key} "
            f"({rows[0][key]:.3f} vs {ours[key]:.3f}), as published benchmarks of zero-shot scGPT found."
        )
    if not cfg.no_umap:
        coords = {m: ig.umap_coords(X, seed=cfg.seed) for m, X in embeddings.items()}
        fig = rep.figure("umap", 9, 3.2 * len(coords))
        ig.plot_umaps(fig, coords, labels, batches)
    return metrics

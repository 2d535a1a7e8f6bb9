"""Evaluation used by the demo and gates: held-out GEP loss against a per-gene-mean baseline, and kNN
cell-type accuracy of an embedding against a PCA baseline."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from data_ingest import keys
from scgpt_dist.checkpoint import LoadedModel
from scgpt_dist.collate import collate, mask_values


def per_gene_mean(table: pa.Table, n_tokens: int) -> np.ndarray:
    """Mean bin value of each gene token over the cells where it appears (NaN where never seen)."""
    genes = table[keys.GENES].combine_chunks().flatten().to_numpy()
    values = table[keys.VALUES].combine_chunks().flatten().to_numpy().astype(np.float64)
    keep = values != keys.PAD_VALUE
    sums = np.bincount(genes[keep], weights=values[keep], minlength=n_tokens)
    counts = np.bincount(genes[keep], minlength=n_tokens)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


@torch.no_grad()
def heldout_gep_loss(
    loaded: LoadedModel,
    table: pa.Table,
    gene_means: np.ndarray,
    mask_ratio: float,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """GEP masked MSE of the model and of the per-gene-mean baseline on the same masked positions."""
    model = loaded.model
    model.eval()
    fallback = float(np.nanmean(gene_means))
    means = torch.from_numpy(np.nan_to_num(gene_means, nan=fallback)).float()
    gen = torch.Generator().manual_seed(seed)
    se_model = se_base = 0.0
    n = 0
    for start in range(0, table.num_rows, batch_size):
        b = collate(table.slice(start, batch_size), loaded.vocab.pad_id)
        masked, mask = mask_values(b.values, mask_ratio, gen)
        batch = (
            b.batch.clamp(max=max(model.cfg.n_batches - 1, 0))
            if model.cfg.use_batch_labels
            else None
        )
        out = model(b.genes, masked, b.padding, batch)
        target = b.values[mask]
        se_model += float(((out["gep"][mask] - target) ** 2).sum())
        se_base += float(((means[b.genes[mask]] - target) ** 2).sum())
        n += int(mask.sum())
    return {"model_mse": se_model / max(n, 1), "baseline_mse": se_base / max(n, 1), "n_masked": n}


def knn_accuracy(
    X: np.ndarray, labels: np.ndarray, k: int = 10, folds: int = 5, seed: int = 0
) -> float:
    """Mean k-fold cross-validated kNN accuracy of predicting `labels` from `X`."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels)
    _, counts = np.unique(labels, return_counts=True)
    folds = int(max(2, min(folds, counts.min()))) if counts.min() >= 2 else 2
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    if counts.min() < folds:
        from sklearn.model_selection import KFold

        cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(labels) - 1))
    return float(cross_val_score(clf, X, labels, cv=cv).mean())


def pca_embedding(X, n_comps: int = 50, log_normalize: bool = False, seed: int = 0) -> np.ndarray:
    """PCA baseline: optional library-size normalization + log1p, then scaled PCA."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    if log_normalize:
        lib = X.sum(1, keepdims=True)
        X = np.log1p(X / np.maximum(lib, 1e-12) * 1e4)
    X = (X - X.mean(0)) / np.maximum(X.std(0), 1e-8)
    n = min(n_comps, X.shape[0] - 1, X.shape[1])
    return PCA(n_components=n, random_state=seed).fit_transform(X)

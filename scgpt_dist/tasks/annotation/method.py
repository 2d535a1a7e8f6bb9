"""Cell-type annotation: splits, metrics and the baselines scGPT's finetuned classifier is compared with.

Baselines (fit on the reference split, scored on the query split):
- `logreg_hvg`: L1-regularised logistic regression on log-normalised highly variable genes. Published work
  (Kedzierska et al. 2023; Boiarsky et al. 2023) found this simple model matches finetuned scGPT.
- `logreg_pca`: logistic regression on a 50-component PCA of the same features.
The from-scratch scGPT control (same architecture and training, random initial weights) is run by the job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scgpt_dist.preprocess import hvg_index


@dataclass
class Split:
    """Row indices of the reference (train) and query (test) cells."""

    reference: np.ndarray
    query: np.ndarray
    how: str


def split_cells(
    obs,
    label_key: str,
    query_key: str | None = None,
    query_values: list[str] | None = None,
    query_fraction: float = 0.3,
    seed: int = 0,
) -> Split:
    """Query = cells whose `query_key` is in `query_values` (e.g. held-out datasets), else a stratified random
    `query_fraction` of the cells. Query cells of a type never seen in the reference are dropped (a classifier
    cannot name them) and the split says how many."""
    n = len(obs)
    if query_key:
        if query_key not in obs:
            raise ValueError(f"--query-key {query_key!r} is not an obs column; have {list(obs)}")
        if not query_values:
            raise ValueError(
                "--query-key needs --query-values (the values that make up the query set)"
            )
        is_query = obs[query_key].astype(str).isin(query_values).to_numpy()
        if not is_query.any() or is_query.all():
            raise ValueError(
                f"--query-values {query_values} select {int(is_query.sum())} of {n} cells; the query and "
                "the reference must both be non-empty"
            )
        ref, qry = np.flatnonzero(~is_query), np.flatnonzero(is_query)
        how = f"query = {query_key} in {query_values}"
    else:
        from sklearn.model_selection import train_test_split

        labels = obs[label_key].astype(str).to_numpy()
        _, counts = np.unique(labels, return_counts=True)
        ref, qry = train_test_split(
            np.arange(n),
            test_size=query_fraction,
            random_state=seed,
            stratify=labels if counts.min() >= 2 else None,
        )
        ref, qry = np.sort(ref), np.sort(qry)
        how = f"stratified random {query_fraction:.0%} query"
    labels = obs[label_key].astype(str).to_numpy()
    seen = np.isin(labels[qry], np.unique(labels[ref]))
    if not seen.all():
        how += f"; {int((~seen).sum())} query cells of types absent from the reference dropped"
    return Split(reference=ref, query=qry[seen], how=how)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
    }


def logreg_hvg(
    X: sp.csr_matrix, y: np.ndarray, split: Split, n_hvg: int = 2000, C: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Query predictions of L1 logistic regression on standardised HVGs (HVGs chosen on the reference)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cols = hvg_index(X[split.reference], n_hvg)
    scaler = StandardScaler(with_mean=False).fit(X[split.reference][:, cols])
    clf = LogisticRegression(
        l1_ratio=1.0, C=C, solver="saga", max_iter=300, tol=1e-3, random_state=seed
    )
    clf.fit(scaler.transform(X[split.reference][:, cols]), y[split.reference])
    return clf.predict(scaler.transform(X[split.query][:, cols]))


def logreg_pca(
    X: sp.csr_matrix,
    y: np.ndarray,
    split: Split,
    n_comps: int = 50,
    n_hvg: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Query predictions of logistic regression on a PCA (fit on the reference) of standardised HVGs."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cols = hvg_index(X[split.reference], n_hvg)
    ref = X[split.reference][:, cols].toarray()
    scaler = StandardScaler().fit(ref)
    pca = PCA(n_components=max(1, min(n_comps, ref.shape[0] - 1, ref.shape[1])), random_state=seed)
    z_ref = pca.fit_transform(scaler.transform(ref))
    z_qry = pca.transform(scaler.transform(X[split.query][:, cols].toarray()))
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(z_ref, y[split.reference])
    return clf.predict(z_qry)

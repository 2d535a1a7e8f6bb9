"""Evaluation used by the demo, the gates, the learning benchmark and the in-training evaluation callback.

- Held-out GEP: the model's masked-value MSE on a fixed set of masked positions (a pure function of the
  records, the mask ratio and a seed), next to baselines that see no context on exactly those positions: each
  gene's mean bin over training cells, its mean per batch (dataset), and its mean per cell type (what
  knowing the cell type buys: the context ceiling a model should approach).
- Embeddings: kNN and linear-probe accuracy, mean pairwise cosine (collapse shows as values near 1), and
  batch kNN (integration: near chance is good).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from data_ingest import keys
from scgpt_dist import preprocess
from scgpt_dist.model.collate import _pad_lists, collate, mask_values

GEP_BASELINES = ("per_gene_mean", "per_gene_batch_mean", "per_gene_type_mean")
"""Context-free baselines of held-out GEP, from the coarsest to the cell-type ceiling."""


def _tokens(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gene ids, values, record index) of every non-`<cls>` token of `table`."""
    genes = table[keys.GENES].combine_chunks()
    offsets = genes.offsets.to_numpy()
    lengths = np.diff(offsets - offsets[0])
    cell = np.repeat(np.arange(table.num_rows), lengths)
    g = genes.flatten().to_numpy()
    v = table[keys.VALUES].combine_chunks().flatten().to_numpy().astype(np.float64)
    keep = v != keys.PAD_VALUE
    return g[keep].astype(np.int64), v[keep], cell[keep]


def _group_means(train: pa.Table, tokens: tuple, group_col: str | None):
    """Sorted (group, gene) keys and their mean values over `train`'s `tokens` (`_tokens(train)`); group 0
    when `group_col` is None."""
    g, v, cell = tokens
    groups = (
        np.zeros(len(g), np.int64)
        if group_col is None
        else train[group_col].to_numpy().astype(np.int64)[cell]
    )
    key = groups * (1 << 32) + g
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq, np.bincount(inv, weights=v) / np.bincount(inv)


def _lookup(uniq: np.ndarray, means: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Means at `key`, NaN where the key was never seen."""
    pos = np.clip(np.searchsorted(uniq, key), 0, max(len(uniq) - 1, 0))
    hit = uniq[pos] == key if len(uniq) else np.zeros(len(key), bool)
    return np.where(hit, means[pos] if len(means) else np.nan, np.nan)


EVAL_MASK = "eval_mask"
"""Column of an evaluation table: per token, True where GEP evaluation masks the value."""


def with_fixed_masks(table: pa.Table, mask_ratio: float, seed: int = 0) -> pa.Table:
    """`table` plus an `EVAL_MASK` column: each record masks `mask_ratio` of its genes (as in training).
    Model and baselines are then scored on exactly these positions, however the table is later split."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, table.num_rows, 256):
        part = table.slice(start, 256)
        b = collate(part, -1)  # no real token has id -1: padding is where the records end
        _, mask = mask_values(b.values, mask_ratio, gen)
        lengths = (~b.padding).sum(1).tolist()
        rows += [mask[r, :n].numpy() for r, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    flat = np.concatenate(rows) if rows else np.zeros(0, bool)
    col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.bool_()))
    if EVAL_MASK in table.column_names:
        table = table.drop_columns([EVAL_MASK])
    return table.append_column(EVAL_MASK, col)


def masked_batches(table: pa.Table, pad_id: int, batch_size: int = 64):
    """Yield (batch, masked input values, mask), all (B, L), over a `with_fixed_masks` table in order."""
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        b = collate(part.drop_columns([EVAL_MASK]), pad_id)
        mask = torch.from_numpy(_pad_lists(part[EVAL_MASK], False, np.bool_))
        mask = torch.nn.functional.pad(mask, (0, b.values.shape[1] - mask.shape[1]))
        yield b, b.values.masked_fill(mask, float(keys.MASK_VALUE)), mask


def gep_baselines(train: pa.Table, held: pa.Table, pad_id: int) -> dict[str, float]:
    """MSE of each of `GEP_BASELINES` on the masked positions of `held` (a `with_fixed_masks` table). Means come from
    `train`'s records; a (gene, group) never seen falls back to the gene's mean, then the global mean.
    `per_gene_type_mean` is left out when the held-out records carry no labels."""
    tokens = _tokens(train)
    gene_keys, gene_means = _group_means(train, tokens, None)
    glob = float(np.mean(tokens[1])) if len(tokens[1]) else 0.0
    per_gene, per_batch, per_type = GEP_BASELINES
    tables = {per_batch: (keys.BATCH, _group_means(train, tokens, keys.BATCH))}
    has_labels = keys.LABEL in held.column_names and bool((held[keys.LABEL].to_numpy() >= 0).any())
    if has_labels:
        tables[per_type] = (keys.LABEL, _group_means(train, tokens, keys.LABEL))
    se = dict.fromkeys([per_gene, *tables], 0.0)
    n = 0
    for b, _, mask in masked_batches(held, pad_id):
        rows, _cols = mask.nonzero(as_tuple=True)
        genes = b.genes[mask].numpy()
        target = b.values[mask].numpy().astype(np.float64)
        base = _lookup(gene_keys, gene_means, genes)
        base = np.where(np.isnan(base), glob, base)
        se[per_gene] += float(((base - target) ** 2).sum())
        for name, (col, (uniq, means)) in tables.items():
            per_cell = b.batch if col == keys.BATCH else b.label
            key = per_cell[rows].numpy().astype(np.int64) * (1 << 32) + genes
            pred = _lookup(uniq, means, key)
            pred = np.where(np.isnan(pred), base, pred)
            se[name] += float(((pred - target) ** 2).sum())
        n += int(mask.sum())
    return {k: v / max(n, 1) for k, v in se.items()}


@torch.no_grad()
def model_scores(
    model: torch.nn.Module,
    pad_id: int,
    table: pa.Table,
    batch_size: int = 64,
    generative: bool = False,
    embed: bool = True,
) -> tuple[float, int, np.ndarray]:
    """(GEP squared error summed over the masked positions of `table` (a `with_fixed_masks` table), their
    count, cell embeddings (N, D) of the unmasked cells; (0, D) without `embed`). Batch ids beyond the
    model's batch table are clamped to its last row (datasets it never saw)."""
    was_training = model.training
    model.eval()
    cfg = model.cfg
    device = next(model.parameters()).device
    se, n, embs = 0.0, 0, []
    try:
        for b, masked, mask in masked_batches(table, pad_id, batch_size):
            batch = b.batch.clamp(max=max(cfg.n_batches - 1, 0)).to(device)
            genes, padding = b.genes.to(device), b.padding.to(device)
            out = model(
                genes,
                masked.to(device),
                padding,
                batch,
                gen_mask=mask.to(device) if generative else None,
            )
            se += float(((out["gep"].float().cpu()[mask] - b.values[mask]) ** 2).sum())
            n += int(mask.sum())
            if embed:
                full = model(genes, b.values.to(device), padding, batch)
                embs.append(full["cell_emb"].float().cpu().numpy())
    finally:
        model.train(was_training)
    emb = np.concatenate(embs) if embs else np.zeros((0, cfg.d_model), np.float32)
    return se, n, emb


def mean_pairwise_cosine(X: np.ndarray, max_cells: int = 2000, seed: int = 0) -> float:
    """Mean cosine similarity over distinct pairs of (at most `max_cells` sampled) rows of `X`."""
    X = np.asarray(X, dtype=np.float64)
    if len(X) > max_cells:
        X = X[np.random.default_rng(seed).choice(len(X), max_cells, replace=False)]
    if len(X) < 2:
        return float("nan")
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    s = Xn.sum(0)
    return float((s @ s - len(Xn)) / (len(Xn) * (len(Xn) - 1)))


def linear_probe_accuracy(
    X: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0
) -> float:
    """Mean k-fold cross-validated accuracy of a logistic regression on standardized `X`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    return float(cross_val_score(clf, X, labels, cv=_cv(labels, folds, seed)).mean())


def _cv(labels: np.ndarray, folds: int, seed: int):
    from sklearn.model_selection import KFold, StratifiedKFold

    _, counts = np.unique(labels, return_counts=True)
    folds = int(max(2, min(folds, counts.min()))) if counts.min() >= 2 else 2
    if counts.min() < folds:
        return KFold(n_splits=folds, shuffle=True, random_state=seed)
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)


def heldout_gep(
    model: torch.nn.Module,
    pad_id: int,
    held: pa.Table,
    train: pa.Table,
    generative: bool = False,
) -> dict:
    """The held-out GEP score every evaluation reports: the model's masked MSE on `held` (a
    `with_fixed_masks` table) and each of `GEP_BASELINES` (means from `train`'s records) on exactly the same
    positions. Returns {"model_mse", "n_masked", "baselines": {name: mse}}."""
    se, n, _ = model_scores(model, pad_id, held, generative=generative, embed=False)
    return {
        "model_mse": se / max(n, 1),
        "n_masked": n,
        "baselines": gep_baselines(train, held, pad_id),
    }


def knn_accuracy(
    X: np.ndarray,
    labels: np.ndarray,
    k: int = 10,
    folds: int = 5,
    seed: int = 0,
    metric: str = "euclidean",
) -> float:
    """Mean k-fold cross-validated kNN accuracy of predicting `labels` from `X` (`metric`: euclidean, as
    scanpy's neighbours, or cosine)."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(labels) - 1), metric=metric)
    return float(cross_val_score(clf, X, labels, cv=_cv(labels, folds, seed)).mean())


def type_only_batch_knn(
    labels: np.ndarray, batches: np.ndarray, k: int = 10, seed: int = 0
) -> float:
    """Batch kNN (`knn_accuracy`) of an embedding that knows the cell type and nothing else (each type one
    point, a cell's neighbours random cells of its type): what a perfectly integrated embedding still scores
    where the datasets' type mixes differ, the floor under the batch kNN of any embedding that keeps types."""
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    X = 10.0 * np.eye(codes.max() + 1)[codes] + rng.normal(0.0, 1e-3, (len(codes), codes.max() + 1))
    return knn_accuracy(X, batches, k=k, seed=seed)


def pca_embedding(X, n_comps: int = 50, log_normalize: bool = False, seed: int = 0) -> np.ndarray:
    """PCA baseline: optional library-size normalization + log1p (`preprocess.log_normalize`), then scaled
    PCA."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    if log_normalize:
        X = preprocess.log_normalize(X)
    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    X = (X - X.mean(0)) / np.maximum(X.std(0), 1e-8)
    n = min(n_comps, X.shape[0] - 1, X.shape[1])
    return PCA(n_components=n, random_state=seed).fit_transform(X)


def sample_joinids(joinids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed, sorted sample of at most `n` of `joinids` (the same for the same ids and seed)."""
    joinids = np.asarray(joinids, np.int64)
    if len(joinids) <= n:
        return np.sort(joinids)
    return np.sort(np.random.default_rng(seed).choice(joinids, n, replace=False))


def heldout_tables(cfg, source, vocab, n_cells: int, seed: int, multiple_of: int = 1):
    """(fixed sample of at most `n_cells` held-out records with their GEP masks, a sample of
    `cfg.eval.baseline_cells` training records for the baselines, the resolved held-out source). The
    held-out sample is cut to a multiple of `multiple_of` cells."""
    from data_ingest.datasource import read_token_table  # Ray Data: only held-out sampling needs it
    from data_ingest.source import HOLDOUT, TRAIN

    tok = cfg.data.tokenizer
    held_src = source.resolve(vocab, HOLDOUT)
    ids = sample_joinids(held_src.joinids, n_cells, seed)
    ids = ids[: len(ids) - len(ids) % multiple_of]
    mask_ratio = (
        cfg.eval.mask_ratio if cfg.eval.mask_ratio is not None else cfg.objectives.mask_ratio
    )
    held = with_fixed_masks(read_token_table(held_src, ids, tok, vocab.cls_id), mask_ratio, seed)
    train_src = source.resolve(vocab, TRAIN)
    train_ids = sample_joinids(train_src.joinids, cfg.eval.baseline_cells, seed + 1)
    return held, read_token_table(train_src, train_ids, tok, vocab.cls_id), held_src


def prepare_eval_set(cfg, source, vocab, world_size: int) -> dict:
    """The fixed held-out sample of a run's in-training evaluation (`EvalConfig`), built on the driver:
    the held-out cells' records with their GEP masks, and the baselines' MSE on those masks. The sample
    is a multiple of `world_size` cells so every rank scores as many (with ZeRO-3 every forward pass is a
    collective)."""
    ev = cfg.eval
    held, train, _ = heldout_tables(cfg, source, vocab, ev.cells, ev.seed, world_size)
    if held.num_rows < 2 * world_size:
        raise ValueError(
            f"eval.every={ev.every} but only {held.num_rows} held-out cells could be scored; raise "
            "data.source.holdout_fraction or set eval.every=0"
        )
    return {
        "table": held,
        "baselines": gep_baselines(train, held, vocab.pad_id),
        "has_labels": bool((held[keys.LABEL].to_numpy() >= 0).any()),
    }


def embedding_scores(
    emb: np.ndarray,
    labels: np.ndarray | None,
    batches: np.ndarray,
    k: int = 10,
    seed: int = 0,
    metric: str = "euclidean",
) -> dict[str, float]:
    """kNN cell-type accuracy (when labels are given), kNN batch accuracy and mean pairwise cosine of `emb`."""
    out = {"mean_cosine": mean_pairwise_cosine(emb, seed=seed)}
    if labels is not None and len(np.unique(labels)) > 1:
        out["knn_type"] = knn_accuracy(emb, labels, k=k, seed=seed, metric=metric)
    if len(np.unique(batches)) > 1:
        out["knn_batch"] = knn_accuracy(emb, batches, k=k, seed=seed, metric=metric)
    return out


def gap_closed(model_mse: float, baselines: dict[str, float]) -> float | None:
    """Share of the gap from the per-gene mean to the per-gene x cell-type mean that the model closes
    (1 = as good as knowing each cell's type; above 1 = better)."""
    if "per_gene_type_mean" not in baselines:
        return None
    gap = baselines["per_gene_mean"] - baselines["per_gene_type_mean"]
    return (baselines["per_gene_mean"] - model_mse) / gap if gap > 0 else None

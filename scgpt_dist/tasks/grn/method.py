"""Gene regulatory / co-expression networks from a pretrained model, and their evaluation against planted truth.

Three gene-gene score matrices over one gene set (genes expressed in a chosen cell state), all (G, G):

- **gene embedding**: cosine similarity of the model's gene token embeddings (`model.encoder`, embedding +
  LayerNorm), plus a kNN graph of it clustered into gene programs with Leiden (igraph);
- **attention**: mean attention among the genes of the chosen cells, recomputed from one layer's q/k
  projections (a forward pre-hook reads the layer's input; the transformer is unchanged). As in the scGPT GRN
  tutorial, each query row is rank-normalised over its keys, then averaged over heads and cells;
- **baseline**: Pearson correlation of log-normalized expression in the same cells.

Evaluation against a synthetic census's planted network (`data_ingest.synth.CensusTruth.to_json`): AUPRC of the
scores vs the planted co-expression edges with the random baseline (edge density), early precision (precision
among the top-k pairs, k = number of true edges) and program recovery (adjusted Rand index and best-match
Jaccard of Leiden programs vs planted modules). Shapes: G genes in the set, N cells, L tokens in a cell's
context (incl. `<cls>`), H heads, Dh head width, D model width.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from data_ingest import keys
from data_ingest.tokenize import TokenizerConfig
from scgpt_dist.model.collate import Batch, collate
from scgpt_dist.preprocess import log_normalize
from scgpt_dist.train.checkpoint import LoadedModel

log = logging.getLogger(__name__)

# Fields of the ground-truth JSON a synthetic census writes next to itself (`CensusTruth.to_json`).
TRUTH_EDGES = "coexpression_edges"
TRUTH_MODULES = "modules"
TRUTH_MODULE_GENES = "genes"
TRUTH_ACTIVE_IN = "active_in"

ATTENTION_NORMS = ("rank", "softmax")


@dataclass
class GrnConfig:
    """How the gene set, the networks and the gene programs are built."""

    min_detection: float = 0.05
    """A gene enters the gene set when it is detected (count > 0) in at least this share of the chosen cells."""
    max_genes: int | None = None
    """Keep at most this many genes of the set (the highest mean expression); None = all."""
    knn: int = 10
    """Neighbours per gene in the kNN graph that Leiden clusters into gene programs."""
    leiden_resolution: float = 1.0
    """Leiden modularity resolution (higher = more, smaller programs)."""
    attention_layer: int = -1
    """Transformer layer whose attention is read (Python indexing: -1 = last)."""
    attention_norm: str = "rank"
    """`rank`: each query row's scores become ranks / (n - 1) before averaging (scGPT tutorial);
    `softmax`: attention probabilities times the context length (1 = uniform)."""
    attention_cells: int = 300
    """Cells of the chosen cell state fed to the model (a seeded subsample when there are more)."""
    attention_passes: int = 2
    """Tokenizations per cell with different seeds: when a cell expresses more genes than fit in the context,
    each pass sees another random subset, so more gene pairs meet."""
    context_len: int | None = None
    """Tokens per cell incl. `<cls>`; None = the model's training `max_seq_len`."""
    batch_size: int = 16
    """Cells per forward pass."""
    attention_apc: bool = False
    """Apply the average product correction (`apc`) to the attention scores: removes the part explained by
    some genes drawing (or giving) attention from every gene (hub stripes), keeping pair-specific attention."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attention_norm not in ATTENTION_NORMS:
            raise ValueError(
                f"attention_norm={self.attention_norm!r}; choose one of {ATTENTION_NORMS}"
            )
        if not 0.0 <= self.min_detection < 1.0:
            raise ValueError(f"min_detection={self.min_detection}; use a share in [0, 1)")
        if self.knn < 1:
            raise ValueError(f"knn={self.knn}; use at least 1 neighbour")
        if self.attention_passes < 1 or self.attention_cells < 1:
            raise ValueError("attention_passes and attention_cells must be at least 1")


# ----------------------------------------------------------------------------------------------- gene set


def select_genes(
    adata: ad.AnnData, min_detection: float, max_genes: int | None = None, vocab=None
) -> list[str]:
    """Genes detected in at least `min_detection` of the cells (and in `vocab` when given), ordered as in
    `adata`; capped at `max_genes` by mean expression."""
    X = sp.csr_matrix(adata.X)
    detected = np.asarray((X > 0).mean(0)).ravel()  # (genes,)
    keep = detected >= min_detection
    if vocab is not None:
        keep &= vocab.lookup(list(adata.var_names.astype(str))) >= 0
    idx = np.flatnonzero(keep)
    if max_genes is not None and len(idx) > max_genes:
        mean = np.asarray(X[:, idx].mean(0)).ravel()
        idx = np.sort(idx[np.argsort(-mean, kind="stable")[:max_genes]])
    if len(idx) < 2:
        raise ValueError(
            f"only {len(idx)} genes are detected in >= {min_detection:.0%} of the {adata.n_obs} cells"
            + (" and known to the model" if vocab is not None else "")
            + "; lower --min-detection or select more cells"
        )
    return adata.var_names[idx].astype(str).tolist()


# ----------------------------------------------------------------------------------------------- scores


def expression_level_scores(adata: ad.AnnData, genes: list[str]) -> np.ndarray:
    """Null control (G, G): m_a + m_b, m = a gene's mean log-normalized expression. It knows no gene pairs, only
    how well expressed each gene is; a score that does no better than this has learned no network."""
    idx = adata.var_names.get_indexer(genes)
    m = log_normalize(adata.X)[:, idx].toarray().mean(0)  # (G,), library sizes over all genes
    return m[:, None] + m[None, :]


def correlation_scores(adata: ad.AnnData, genes: list[str]) -> np.ndarray:
    """Pearson correlation (G, G) of log-normalized expression across the cells of `adata`; 0 for genes
    without variance."""
    idx = adata.var_names.get_indexer(genes)
    if (idx < 0).any():
        raise ValueError(f"{int((idx < 0).sum())} of the genes are not in the data's var_names")
    Y = log_normalize(adata.X)[:, idx].toarray()  # (N, G)
    Y = Y - Y.mean(0)
    norm = np.linalg.norm(Y, axis=0)  # (G,)
    Y = Y / np.where(norm > 0, norm, 1.0)
    corr = Y.T @ Y  # (G, G)
    corr[norm == 0] = 0.0
    corr[:, norm == 0] = 0.0
    np.fill_diagonal(corr, 1.0)
    return corr


@torch.no_grad()
def gene_embeddings(loaded: LoadedModel, genes: list[str]) -> np.ndarray:
    """The model's gene token embeddings (G, D) (embedding + LayerNorm, the transformer's gene input)."""
    ids = loaded.vocab.lookup(genes)
    if (ids < 0).any():
        missing = [g for g, i in zip(genes, ids, strict=True) if i < 0][:5]
        raise ValueError(f"genes unknown to the model's vocabulary: {missing}; drop them first")
    return loaded.model.encoder(torch.from_numpy(ids)).float().numpy()  # (G, D)


def cosine_similarity(emb: np.ndarray) -> np.ndarray:
    """(G, D) -> (G, G) cosine similarity."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # (G, D)
    return unit @ unit.T


def _rank_rows(scores: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension scaled to [0, 1] (ties broken by position)."""
    n = scores.shape[-1]
    order = scores.argsort(-1)  # (..., n)
    steps = torch.arange(n, dtype=torch.float32).expand(order.shape)  # (..., n)
    ranks = torch.empty(order.shape, dtype=torch.float32).scatter_(-1, order, steps)
    return ranks / max(n - 1, 1)


def _attention_module(model, layer: int):
    layers = model.transformer_encoder.layers
    if not -len(layers) <= layer < len(layers):
        raise ValueError(
            f"attention layer {layer} but the model has {len(layers)} layers; "
            f"use 0..{len(layers) - 1} or -1 for the last"
        )
    return layers[layer].self_attn


@torch.no_grad()
def layer_qkv(model, layer: int, batch: Batch) -> tuple[torch.Tensor, ...]:
    """q, k, v (each (T, H, Dh), packed tokens) of one layer's self-attention for a padded batch, recomputed
    from that layer's input (read by a forward pre-hook) and its fused `Wqkv` projection, and the Packing
    (cell c owns packed rows `packing.cu_seqlens[c]:packing.cu_seqlens[c + 1]`, `<cls>` first)."""
    attn = _attention_module(model, layer)
    captured: dict = {}

    def grab_input(_module, args):
        captured["x"], captured["packing"] = args[0], args[1]

    handle = attn.register_forward_pre_hook(grab_input)
    try:
        model.encode(batch.genes, batch.values, batch.padding)
    finally:
        handle.remove()
    x, packing = captured["x"], captured["packing"]  # (T, D)
    t, d = x.shape
    qkv = attn.Wqkv(x).view(t, 3, attn.n_heads, d // attn.n_heads)  # (T, 3, H, Dh)
    q, k, v = qkv.unbind(1)  # 3 x (T, H, Dh)
    return q, k, v, packing


@torch.no_grad()
def attention_scores(
    loaded: LoadedModel, adata: ad.AnnData, genes: list[str], cfg: GrnConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric mean attention among `genes` over the cells of `adata` (G, G), and in how many (cell, pass)
    contexts each gene pair met (G, G). Pairs that never met get the mean score of those that did."""
    from scgpt_dist.inference import tokenize_anndata

    model = loaded.model.eval()
    _attention_module(model, cfg.attention_layer)  # validates the layer index early
    ids = loaded.vocab.lookup(genes)
    if (ids < 0).any():
        raise ValueError(
            f"{int((ids < 0).sum())} genes are unknown to the model's vocabulary; select genes with "
            "`select_genes(..., vocab=loaded.vocab)`"
        )
    g = len(genes)
    gene_index = np.full(len(loaded.vocab), -1, np.int64)  # vocab id -> position in `genes`
    gene_index[ids] = np.arange(g)
    sub = adata[:, adata.var_names.get_indexer(genes)]
    total = np.zeros((g, g))  # sum of directed (query row, key column) scores
    count = np.zeros((g, g))  # contexts holding both genes (symmetric)
    base_tok = loaded.config.data.tokenizer
    context = cfg.context_len or base_tok.max_seq_len
    for p in range(cfg.attention_passes):
        tok = TokenizerConfig(**{**base_tok.__dict__, "max_seq_len": context, "seed": cfg.seed + p})
        table = tokenize_anndata(sub, loaded.vocab, tok)
        for start in range(0, table.num_rows, cfg.batch_size):
            b = collate(table.slice(start, cfg.batch_size), loaded.vocab.pad_id)
            q, k, _, packing = layer_qkv(model, cfg.attention_layer, b)  # (T, H, Dh)
            scale = q.shape[-1] ** -0.5
            genes_packed = packing.pack(b.genes).numpy()  # (T,)
            cu = packing.cu_seqlens.tolist()
            for lo, hi in zip(cu[:-1], cu[1:], strict=True):
                qc = q[lo:hi].transpose(0, 1)  # (H, L, Dh)
                kc = k[lo:hi].transpose(0, 1)  # (H, L, Dh)
                logits = qc @ kc.transpose(1, 2) * scale  # (H, L, L)
                if cfg.attention_norm == "softmax":
                    # Probabilities over the whole context (as the model attends), times L.
                    a = logits.softmax(-1)[:, 1:, 1:] * (hi - lo)  # (H, L-1, L-1)
                else:
                    a = _rank_rows(logits[:, 1:, 1:])  # (H, L-1, L-1), <cls> left out
                idx = gene_index[genes_packed[lo + 1 : hi]]  # (L-1,)
                ok = idx >= 0
                idx = idx[ok]
                total[np.ix_(idx, idx)] += a.mean(0).numpy()[np.ix_(ok, ok)]  # (n, n)
                count[np.ix_(idx, idx)] += 1.0
    seen = count > 0
    scores = np.zeros((g, g))
    scores[seen] = (total + total.T)[seen] / (2.0 * count[seen])
    off = seen & ~np.eye(g, dtype=bool)
    scores[~seen] = float(scores[off].mean()) if off.any() else 0.0
    if cfg.attention_apc:
        scores = apc(scores)
    np.fill_diagonal(scores, scores.max())
    return scores, count


def apc(scores: np.ndarray) -> np.ndarray:
    """Average product correction (G, G): s_ab - mean_a * mean_b / mean, with means over off-diagonal
    entries (as in contact prediction from coevolution / attention maps). A matrix that is only the product
    of per-gene "hubness" values becomes about 0."""
    s = scores.astype(np.float64).copy()
    g = len(s)
    off = ~np.eye(g, dtype=bool)
    s[~off] = 0.0
    row = s.sum(1) / (g - 1)  # (G,)
    col = s.sum(0) / (g - 1)  # (G,)
    mean = s[off].mean()
    out = s - np.outer(row, col) / (mean if mean != 0 else 1.0)
    out[~off] = 0.0
    return out


# ----------------------------------------------------------------------------------------------- programs


def knn_graph(sim: np.ndarray, k: int):
    """Undirected igraph kNN graph of a (G, G) similarity (each gene to its k most similar others); edge
    weight = similarity clipped to a small positive floor (modularity needs non-negative weights)."""
    import igraph as ig

    g = sim.shape[0]
    k = min(k, g - 1)
    s = sim.astype(np.float64).copy()
    np.fill_diagonal(s, -np.inf)
    nbrs = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (G, k)
    src = np.repeat(np.arange(g), k)
    dst = nbrs.ravel()
    w = np.maximum(s[src, dst], 1e-6)
    graph = ig.Graph(n=g, edges=list(zip(src.tolist(), dst.tolist(), strict=True)), directed=False)
    graph.es["weight"] = w.tolist()
    graph.simplify(combine_edges="max")
    return graph


def leiden_programs(sim: np.ndarray, k: int, resolution: float, seed: int = 0) -> np.ndarray:
    """Gene program label (G,) per gene: Leiden (modularity) on the kNN graph of `sim`."""
    graph = knn_graph(sim, k)
    state = random.getstate()
    random.seed(seed)  # python-igraph draws from Python's `random`
    try:
        parts = graph.community_leiden(
            objective_function="modularity",
            weights="weight",
            resolution=resolution,
            n_iterations=-1,
        )
    finally:
        random.setstate(state)
    return np.asarray(parts.membership, dtype=np.int64)


# ----------------------------------------------------------------------------------------------- truth


@dataclass
class PlantedNetwork:
    """Planted co-expression modules and edges of a synthetic census."""

    modules: list[list[str]]
    """Gene names of each module."""
    active_in: list[list[str]]
    """Cell types in which each module is active."""
    edges: set[tuple[str, str]]
    """Planted undirected edges (gene pairs within a module), each stored once as (a, b)."""

    @classmethod
    def from_json(cls, truth: dict) -> PlantedNetwork:
        if TRUTH_EDGES not in truth or TRUTH_MODULES not in truth:
            raise ValueError(
                f"ground truth lacks `{TRUTH_EDGES}` / `{TRUTH_MODULES}`; pass the "
                "<census>.ground_truth.json that `python -m data_ingest.synth` writes"
            )
        mods = truth[TRUTH_MODULES]
        return cls(
            modules=[list(m[TRUTH_MODULE_GENES]) for m in mods],
            active_in=[list(m.get(TRUTH_ACTIVE_IN, [])) for m in mods],
            edges={(str(a), str(b)) for a, b in truth[TRUTH_EDGES]},
        )

    @classmethod
    def load(cls, path: str | Path) -> PlantedNetwork:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no ground truth at {path}; pass --truth <census>.ground_truth.json"
            )
        return cls.from_json(json.loads(path.read_text()))

    def module_ids(self, cell_type: str | None = None) -> list[int]:
        """All modules, or those active in `cell_type`."""
        return [
            m for m, active in enumerate(self.active_in) if cell_type is None or cell_type in active
        ]

    def module_labels(self, genes: list[str], cell_type: str | None = None) -> np.ndarray:
        """Planted module of each gene (G,), -1 for genes in none (of the modules active in `cell_type`)."""
        pos = {g: i for i, g in enumerate(genes)}
        labels = np.full(len(genes), -1, np.int64)
        for m in self.module_ids(cell_type):
            for gene in self.modules[m]:
                if gene in pos:
                    labels[pos[gene]] = m
        return labels

    def edge_matrix(self, genes: list[str], cell_type: str | None = None) -> np.ndarray:
        """Boolean symmetric (G, G): planted edges among `genes` (of modules active in `cell_type`)."""
        pos = {g: i for i, g in enumerate(genes)}
        allowed = set(self.module_ids(cell_type))
        gene_module = {g: m for m, mod in enumerate(self.modules) for g in mod}
        out = np.zeros((len(genes), len(genes)), dtype=bool)
        for a, b in self.edges:
            if a in pos and b in pos and gene_module.get(a) in allowed:
                out[pos[a], pos[b]] = out[pos[b], pos[a]] = True
        return out


def find_truth(data: str | Path) -> Path:
    """The ground truth JSON next to a synthetic census (`<census>.ground_truth.json`), given the census
    collection or its `census_data/<organism>` experiment."""
    from data_ingest.synth import GROUND_TRUTH_SUFFIX

    path = Path(data).resolve()
    candidates = [path]
    if path.parent.name == keys.CENSUS_DATA:
        candidates.append(path.parent.parent)
    for c in candidates:
        truth = Path(str(c) + GROUND_TRUTH_SUFFIX)
        if truth.is_file():
            return truth
    raise FileNotFoundError(
        f"no {GROUND_TRUTH_SUFFIX} next to {data}; pass --truth with the ground truth JSON of a synthetic "
        "census (`python -m data_ingest.synth` writes it)"
    )


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass
class EdgeMetrics:
    """How well a score matrix ranks the planted edges among all gene pairs."""

    auprc: float
    """Average precision of the pair scores vs planted edges."""
    random_auprc: float
    """AUPRC of random scores = edge density (positives / pairs)."""
    early_precision: float
    """Precision among the k highest-scoring pairs, k = number of planted edges."""
    auroc: float
    n_edges: int
    n_pairs: int

    @property
    def auprc_ratio(self) -> float:
        return self.auprc / self.random_auprc if self.random_auprc > 0 else float("nan")

    @property
    def early_precision_ratio(self) -> float:
        return self.early_precision / self.random_auprc if self.random_auprc > 0 else float("nan")


def _pairs(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape != truth.shape or scores.shape[0] != scores.shape[1]:
        raise ValueError(
            f"scores {scores.shape} and truth {truth.shape} must be the same square matrix"
        )
    iu = np.triu_indices(scores.shape[0], 1)
    return scores[iu].astype(np.float64), truth[iu].astype(bool)


def evaluate_edges(scores: np.ndarray, truth: np.ndarray) -> EdgeMetrics:
    """Rank all unordered gene pairs (upper triangle) by `scores` against the boolean `truth` (G, G)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, y = _pairs(scores, truth)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(
            f"{n_pos} of {len(y)} gene pairs are planted edges; the gene set must hold some planted edges "
            "and some non-edges (lower --min-detection, or check the ground truth matches the data)"
        )
    if not np.isfinite(s).all():
        raise ValueError("edge scores contain NaN or infinite values")
    return EdgeMetrics(
        auprc=float(average_precision_score(y, s)),
        random_auprc=n_pos / len(y),
        early_precision=_precision_at(s, y, n_pos),
        auroc=float(roc_auc_score(y, s)),
        n_edges=n_pos,
        n_pairs=len(y),
    )


def _precision_at(s: np.ndarray, y: np.ndarray, k: int) -> float:
    """Precision among the k highest scores; pairs tied with the k-th score count with their group's share of
    true edges (the expectation over tie orders), so the gene order cannot help or hurt."""
    kth = np.partition(-s, k - 1)[k - 1]  # minus the k-th highest score
    above = -s < kth
    tied = -s == kth
    n_above = int(above.sum())
    return float((y[above].sum() + (k - n_above) * y[tied].mean()) / k)


def pr_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of the pair ranking, for plotting."""
    from sklearn.metrics import precision_recall_curve

    s, y = _pairs(scores, truth)
    precision, recall, _ = precision_recall_curve(y, s)
    return recall, precision


@dataclass
class ProgramMetrics:
    """How well gene programs (cluster labels) recover the planted modules."""

    ari: float
    """Adjusted Rand index between programs and planted modules, over the genes of planted modules."""
    best_match_jaccard: float
    """Mean over planted modules of the best Jaccard overlap with any program (programs include every
    gene of the set, so programs that swallow background genes score lower)."""
    n_programs: int
    n_modules: int


def program_recovery(programs: np.ndarray, modules: np.ndarray) -> ProgramMetrics:
    """programs: (G,) cluster label of every gene; modules: (G,) planted module or -1 (not in a module)."""
    from sklearn.metrics import adjusted_rand_score

    in_module = modules >= 0
    mods = np.unique(modules[in_module])
    if len(mods) == 0:
        raise ValueError("no gene of the set belongs to a planted module; nothing to recover")
    jaccards = []
    for m in mods:
        members = modules == m
        best = 0.0
        for p in np.unique(programs[members]):
            prog = programs == p
            best = max(best, (members & prog).sum() / (members | prog).sum())
        jaccards.append(best)
    return ProgramMetrics(
        ari=float(adjusted_rand_score(modules[in_module], programs[in_module])),
        best_match_jaccard=float(np.mean(jaccards)),
        n_programs=len(np.unique(programs)),
        n_modules=len(mods),
    )


def top_edges(
    scores: np.ndarray,
    genes: list[str],
    k: int,
    truth: np.ndarray | None = None,
    modules: np.ndarray | None = None,
) -> list[dict]:
    """The k highest-scoring gene pairs: gene_a, gene_b, score, and whether each is a planted edge."""
    iu = np.triu_indices(len(genes), 1)
    s = scores[iu]
    order = np.argsort(-s, kind="stable")[:k]
    rows = []
    for rank, o in enumerate(order, 1):
        i, j = int(iu[0][o]), int(iu[1][o])
        row = {"rank": rank, "gene_a": genes[i], "gene_b": genes[j], "score": float(s[o])}
        if truth is not None:
            row["planted"] = "yes" if truth[i, j] else "no"
        if modules is not None:
            row["module_a"] = int(modules[i])
            row["module_b"] = int(modules[j])
        rows.append(row)
    return rows

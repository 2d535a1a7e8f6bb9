"""Gene regulatory / co-expression networks from a pretrained model (their evaluation against planted truth is
in `metrics.py`).

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

import logging
import random
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from data_ingest.tokenize import TokenizerConfig
from scgpt_dist.inference import tokenize_anndata
from scgpt_dist.model.collate import Batch, collate
from scgpt_dist.preprocess import log_normalize
from scgpt_dist.train.checkpoint import LoadedModel

log = logging.getLogger(__name__)

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

"""Inference: tokenize an AnnData with a model's vocabulary and tokenizer, and embed its cells."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch

from data_ingest.progress import progress
from data_ingest.soma_store import validate_anndata
from data_ingest.tokenize import TokenizerConfig, TokenizeStats, tokenize_csr
from data_ingest.vocab import GeneVocab
from scgpt_dist.model.collate import collate
from scgpt_dist.train.checkpoint import LoadedModel

log = logging.getLogger(__name__)

EMBEDDING_KEY = "X_scGPT"


def feature_tokens_for(
    gene_names: list[str], vocab: GeneVocab, max_unknown_fraction: float = 0.5
) -> np.ndarray:
    """Vocabulary id per gene column (-1 = unknown); errors when too few genes are known."""
    tokens = vocab.lookup(gene_names)
    unknown = int((tokens < 0).sum())
    if unknown == len(gene_names):
        raise ValueError(
            f"none of the {len(gene_names)} genes are in the model's vocabulary (e.g. {gene_names[:3]}); "
            "use gene symbols as var_names, or pass --gene-column with the column that holds them"
        )
    if unknown / len(gene_names) > max_unknown_fraction:
        examples = [g for g, t in zip(gene_names, tokens, strict=True) if t < 0][:5]
        raise ValueError(
            f"{unknown} of {len(gene_names)} genes are unknown to the model's vocabulary (e.g. {examples}); "
            "check the gene naming, or pass --max-unknown-fraction to accept dropping them"
        )
    if unknown:
        log.warning(
            "%d of %d genes are unknown to the vocabulary and are ignored", unknown, len(gene_names)
        )
    return tokens


def tokenize_anndata(
    adata: ad.AnnData,
    vocab: GeneVocab,
    tok: TokenizerConfig,
    max_unknown_fraction: float = 0.5,
    stats: TokenizeStats | None = None,
) -> pa.Table:
    """Token records for every cell of `adata` (cell_id = row position)."""
    validate_anndata(adata)
    tokens = feature_tokens_for(list(adata.var_names.astype(str)), vocab, max_unknown_fraction)
    X = sp.csr_matrix(adata.X)
    X.sort_indices()
    # min_genes=0 keeps every cell so rows line up with adata; empty cells embed from <cls> alone.
    tok0 = TokenizerConfig(**{**tok.__dict__, "min_genes": 0})
    return tokenize_csr(
        X.indptr, X.indices, X.data, np.arange(adata.n_obs), tokens, tok0, vocab.cls_id, stats=stats
    )


@torch.no_grad()
def embed_table(
    loaded: LoadedModel, table: pa.Table, batch_size: int = 64, show_progress: bool = False
) -> np.ndarray:
    """L2-normalized `<cls>` embeddings, (n_cells, D), in table row order."""
    model = loaded.model
    model.eval()
    out = []
    starts = range(0, table.num_rows, batch_size)
    for start in progress(starts, desc="embed", unit="batch", enabled=show_progress):
        b = collate(table.slice(start, batch_size), loaded.vocab.pad_id)
        h, _ = model.encode(b.genes, b.values, b.padding)  # (B, L, D)
        out.append(model.cell_embedding(h, b.values, b.padding).float().numpy())
    emb = np.concatenate(out) if out else np.zeros((0, model.cfg.d_model), np.float32)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norm, 1e-12)


def embed_anndata(
    loaded: LoadedModel,
    adata: ad.AnnData,
    batch_size: int = 64,
    max_unknown_fraction: float = 0.5,
    show_progress: bool = False,
) -> np.ndarray:
    tok = loaded.config.data.tokenizer
    table = tokenize_anndata(adata, loaded.vocab, tok, max_unknown_fraction)
    return embed_table(loaded, table, batch_size, show_progress)

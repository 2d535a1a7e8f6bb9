"""The scGPT transformer, top to bottom: embeddings, attention, block, transformer, heads.

Module and parameter names follow the scGPT reference (`encoder`, `value_encoder`, `batch_encoder`,
`transformer_encoder.layers.N.self_attn.Wqkv`, `decoder`, `mvc_decoder`) so reference checkpoints map onto it
with a thin adapter. Shapes: B cells, L genes in context (incl. `<cls>`), D model width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from scgpt_dist.attention import attend
from scgpt_dist.config import ModelConfig

# ----------------------------------------------------------------------------------------------- embeddings


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm."""

    def __init__(self, n_tokens: int, d_model: int, pad_id: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(genes))  # (B, L, D)


class ContinuousValueEncoder(nn.Module):
    """Expression value (a bin id as a float) -> D, through a two-layer MLP (scGPT's continuous style)."""

    def __init__(self, d_model: int, dropout: float, max_value: float):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.unsqueeze(-1).clamp(max=self.max_value)  # (B, L, 1)
        x = self.linear2(self.activation(self.linear1(x)))  # (B, L, D)
        return self.dropout(self.norm(x))


class BatchLabelEncoder(nn.Module):
    """Batch (dataset) id -> D."""

    def __init__(self, n_batches: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(n_batches, d_model)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(batch))  # (B, D)


# ----------------------------------------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (flash-attn's `Wqkv` layout: q, k, v stacked)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, backend: str):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.backend = backend
        self.Wqkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        b, seq, d = x.shape
        qkv = self.Wqkv(x).view(b, seq, 3, self.n_heads, d // self.n_heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        p = self.dropout if self.training else 0.0
        out = attend(q, k, v, key_padding_mask, p, self.backend)  # (B, H, L, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, seq, d))  # (B, L, D)


# ----------------------------------------------------------------------------------------------- block


class EncoderLayer(nn.Module):
    """Post-norm transformer block (the reference's layer: attention, add & norm, ReLU MLP, add & norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = SelfAttention(d, cfg.n_heads, cfg.dropout, cfg.attention)
        self.linear1 = nn.Linear(d, cfg.d_hid)
        self.linear2 = nn.Linear(cfg.d_hid, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, key_padding_mask)))  # (B, L, D)
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))  # (B, L, D)
        return self.norm2(x + self.dropout2(ff))


# ----------------------------------------------------------------------------------------------- transformer


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, key_padding_mask, use_reentrant=False
                )
            else:
                x = layer(x, key_padding_mask)
        return x  # (B, L, D)


# ----------------------------------------------------------------------------------------------- heads


class ExprDecoder(nn.Module):
    """Per-gene value prediction from the gene's output (GEP)."""

    def __init__(self, d_in: int, d_model: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_in, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h).squeeze(-1)  # (B, L)


class MVCDecoder(nn.Module):
    """GEPC / MVC: a gene's value as the inner product of its query vector and the cell embedding."""

    def __init__(self, d_model: int, d_cell: int):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_cell, bias=False)

    def forward(self, cell_emb: torch.Tensor, gene_embs: torch.Tensor) -> torch.Tensor:
        query = self.query_activation(self.gene2query(gene_embs))  # (B, L, D)
        return torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)  # (B, L)


class ScGPT(nn.Module):
    """Gene + value (+ batch) embeddings -> transformer -> `<cls>` cell embedding, GEP and GEPC heads."""

    def __init__(self, cfg: ModelConfig, n_tokens: int, pad_id: int):
        super().__init__()
        if cfg.use_batch_labels and cfg.n_batches < 1:
            raise ValueError(
                "model.use_batch_labels needs model.n_batches >= 1 (filled in from the data)"
            )
        self.cfg = cfg
        self.n_tokens = n_tokens
        self.pad_id = pad_id
        d = cfg.d_model
        self.encoder = GeneEncoder(n_tokens, d, pad_id)
        self.value_encoder = ContinuousValueEncoder(d, cfg.dropout, cfg.max_value)
        if cfg.use_batch_labels:
            self.batch_encoder = BatchLabelEncoder(cfg.n_batches, d)
        self.transformer_encoder = TransformerEncoder(cfg)
        d_cell = 2 * d if cfg.use_batch_labels else d
        self.decoder = ExprDecoder(d_cell, d)
        self.mvc_decoder = MVCDecoder(d, d_cell)

    def encode(
        self, genes: torch.Tensor, values: torch.Tensor, key_padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer output (B, L, D) and the gene token embeddings (B, L, D)."""
        gene_embs = self.encoder(genes)  # (B, L, D)
        x = gene_embs + self.value_encoder(values)  # (B, L, D)
        return self.transformer_encoder(x, key_padding_mask), gene_embs

    def cell_embedding(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0, :]  # (B, D) the <cls> position

    def forward(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        key_padding_mask: torch.Tensor,
        batch: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        h, gene_embs = self.encode(genes, values, key_padding_mask)  # (B, L, D)
        cell_emb = self.cell_embedding(h)  # (B, D)
        out = {"cell_emb": cell_emb}
        if self.cfg.use_batch_labels:
            if batch is None:
                raise ValueError("this model uses batch labels; pass `batch`")
            batch_emb = self.batch_encoder(batch)  # (B, D)
            h = torch.cat(
                [h, batch_emb.unsqueeze(1).expand(-1, h.shape[1], -1)], dim=2
            )  # (B, L, 2D)
            cell_rep = torch.cat([cell_emb, batch_emb], dim=1)  # (B, 2D)
        else:
            cell_rep = cell_emb
        out["gep"] = self.decoder(h)  # (B, L)
        out["gepc"] = self.mvc_decoder(cell_rep, gene_embs)  # (B, L)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Approximate training FLOPs per token (6 x matmul params + attention), for MFU estimates."""
        d, n_layers = self.cfg.d_model, self.cfg.n_layers
        matmul = n_layers * (4 * d * d + 2 * d * self.cfg.d_hid)
        return 6.0 * matmul + 12.0 * n_layers * d * seq_len


def build_model(cfg: ModelConfig, n_tokens: int, pad_id: int) -> ScGPT:
    return ScGPT(cfg, n_tokens, pad_id)

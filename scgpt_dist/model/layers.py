"""The transformer's building blocks: token embeddings (gene, value, batch), domain-specific batch norm,
packed self-attention, the encoder block and the stack. Shapes: B cells, L genes in context (incl. `<cls>`),
T packed tokens (the batch's real tokens), D model width."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_ingest import keys
from scgpt_dist.model.attention import attend, dropout_keep_mask
from scgpt_dist.model.config import ModelConfig
from scgpt_dist.model.packing import Packing


class Dropout(nn.Dropout):
    """`nn.Dropout` whose CPU training mask comes from `attention.dropout_keep_mask` (16 random bits per
    element; several times cheaper than `bernoulli_`, p rounded to a multiple of 2**-16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        keep, scale = dropout_keep_mask(x.shape, self.p, x.device)
        return x * keep.mul_(scale).to(x.dtype)


# ----------------------------------------------------------------------------------------------- embeddings


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm."""

    def __init__(self, n_tokens: int, d_model: int, pad_id: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(genes))  # (T, D)


class ContinuousValueEncoder(nn.Module):
    """Expression value (a bin id as a float) -> D, through a two-layer MLP (scGPT's continuous style)."""

    def __init__(self, d_model: int, dropout: float, max_value: float):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.unsqueeze(-1).clamp(max=self.max_value)  # (T, 1)
        x = self.linear2(self.activation(self.linear1(x)))  # (T, D)
        return self.dropout(self.norm(x))


class CategoryValueEncoder(nn.Module):
    """Bin id -> D through an embedding table (scGPT's category style).

    Rows 0..n_bins-1 are bins; the pad value gets row n_bins and the mask value row n_bins+1 (the reference's
    `n_input_bins = n_bins + 2`, `pad_value = n_bins`, `mask_value = n_bins + 1` convention).
    """

    def __init__(self, n_bins: int, d_model: int):
        super().__init__()
        self.n_bins = n_bins
        self.embedding = nn.Embedding(n_bins + 2, d_model, padding_idx=n_bins)
        self.enc_norm = nn.LayerNorm(d_model)

    def codes(self, values: torch.Tensor) -> torch.Tensor:
        """Our value codes (bins, PAD_VALUE, MASK_VALUE) -> embedding rows."""
        codes = values.long()
        codes = codes.masked_fill(values == keys.PAD_VALUE, self.n_bins)
        return codes.masked_fill(values == keys.MASK_VALUE, self.n_bins + 1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(self.codes(values)))  # (T, D)


class BatchLabelEncoder(nn.Module):
    """A per-cell label (batch / dataset, or modality) -> D."""

    def __init__(self, n_labels: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(n_labels, d_model)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(labels))  # (B, D)


class DomainSpecificBatchNorm1d(nn.Module):
    """One BatchNorm per domain (batch label); each token is normalized by its cell's domain's statistics.

    The reference normalizes a whole micro-batch with the first cell's domain; per-cell routing is the same when a
    micro-batch holds one domain, and right when it holds several. Statistics exclude padding.
    """

    def __init__(self, d_model: int, n_domains: int, eps: float = 6.1e-5):
        super().__init__()
        self.bns = nn.ModuleList(
            [nn.BatchNorm1d(d_model, eps=eps, affine=False) for _ in range(n_domains)]
        )

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """x: (T, D); domain: (T,)."""
        if int(domain.max()) >= len(self.bns):
            raise ValueError(
                f"batch label {int(domain.max())} exceeds the {len(self.bns)} DSBN domains of this model"
            )
        out = torch.zeros_like(x)
        for d in domain.unique().tolist():
            sel = (domain == d).nonzero().squeeze(1)  # (T_d,)
            out = out.index_copy(0, sel, self.bns[d](x[sel]))
        return out  # (T, D)


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

    def forward(self, x: torch.Tensor, packing: Packing, gen: torch.Tensor | None) -> torch.Tensor:
        t, d = x.shape
        qkv = self.Wqkv(x).view(t, 3, self.n_heads, d // self.n_heads)  # (T, 3, H, Dh)
        q, k, v = qkv.unbind(1)  # 3 x (T, H, Dh)
        p = self.dropout if self.training else 0.0
        out = attend(q, k, v, packing, p, self.backend, gen)  # (T, H, Dh)
        return self.out_proj(out.reshape(t, d))  # (T, D)


# ----------------------------------------------------------------------------------------------- block


class EncoderLayer(nn.Module):
    """Transformer block: post-norm as the reference's layer (attention, add & norm, ReLU MLP, add & norm),
    or pre-norm with `norm_first` (x + attention(norm(x)), then x + MLP(norm(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = SelfAttention(d, cfg.n_heads, cfg.dropout, cfg.attention)
        self.linear1 = nn.Linear(d, cfg.d_hid)
        self.linear2 = nn.Linear(cfg.d_hid, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = Dropout(cfg.dropout)
        self.dropout1 = Dropout(cfg.dropout)
        self.dropout2 = Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def forward(self, x: torch.Tensor, packing: Packing, gen: torch.Tensor | None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), packing, gen))  # (T, D)
            ff = self.linear2(self.dropout(F.relu(self.linear1(self.norm2(x)))))  # (T, D)
            return x + self.dropout2(ff)
        x = self.norm1(x + self.dropout1(self.self_attn(x, packing, gen)))  # (T, D)
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))  # (T, D)
        return self.norm2(x + self.dropout2(ff))


# ----------------------------------------------------------------------------------------------- transformer


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else None
        self.gradient_checkpointing = False

    def forward(
        self, x: torch.Tensor, packing: Packing, gen: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, packing, gen, use_reentrant=False)
            else:
                x = layer(x, packing, gen)
        return x if self.final_norm is None else self.final_norm(x)  # (T, D)

"""The scGPT transformer, top to bottom: embeddings, attention, block, transformer, heads.

Module and parameter names follow the scGPT reference `TransformerModel` (`encoder`, `value_encoder`,
`batch_encoder`, `dsbn`, `transformer_encoder.layers.N.self_attn.Wqkv`, `decoder`, `mvc_decoder`, `cls_decoder`,
`grad_reverse_discriminator`) so reference checkpoints map onto it with a thin adapter (`interchange.py`).

Inside, a batch's real tokens are packed, (T, D) with T = non-padding tokens, so no layer computes padding;
outputs are scattered back to the padded (B, L) layout. Shapes: B cells, L genes in context (incl. `<cls>`),
T packed tokens, D model width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_ingest import keys
from scgpt_dist.model.attention import Packing, attend, dropout_keep_mask
from scgpt_dist.model.config import ModelConfig

PERT_PAD_ID = 2
"""Perturbation-flag code for padding (0 = not perturbed, 1 = perturbed), as in the reference."""


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


# ----------------------------------------------------------------------------------------------- heads


def _mlp3(d_in: int, d_model: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, 1),
    )


class ExprDecoder(nn.Module):
    """Per-gene value prediction from the gene's output (GEP), optionally with a non-zero probability."""

    def __init__(self, d_in: int, d_model: int, explicit_zero_prob: bool):
        super().__init__()
        self.fc = _mlp3(d_in, d_model)
        if explicit_zero_prob:
            self.zero_logit = _mlp3(d_in, d_model)
        self.explicit_zero_prob = explicit_zero_prob

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"pred": self.fc(h).squeeze(-1)}  # (T,)
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(h).squeeze(-1))  # (T,)
        return out


class MVCDecoder(nn.Module):
    """GEPC / MVC: a gene's value as the inner product of its query vector and the cell embedding."""

    def __init__(self, d_model: int, d_cell: int, explicit_zero_prob: bool):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_cell, bias=False)
        if explicit_zero_prob:
            self.W_zero_logit = nn.Linear(d_model, d_cell)
        self.explicit_zero_prob = explicit_zero_prob

    def forward(self, cell_rep: torch.Tensor, gene_embs: torch.Tensor) -> dict[str, torch.Tensor]:
        """cell_rep: (T, D_cell), the token's cell representation; gene_embs: (T, D)."""
        query = self.query_activation(self.gene2query(gene_embs))  # (T, D)
        out = {"pred": (self.W(query) * cell_rep).sum(-1)}  # (T,)
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid((self.W_zero_logit(query) * cell_rep).sum(-1))
        return out


class ClsDecoder(nn.Module):
    """Cell-type classifier on the cell embedding (CLS)."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int, activation: type[nn.Module]):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), activation(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)  # (B, n_cls)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.neg() * ctx.lambd, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -lambd backward."""
    return _GradReverse.apply(x, lambd)


class AdversarialDiscriminator(ClsDecoder):
    """DAR: batch discriminator behind a gradient-reversal layer (the encoder learns to hide the batch)."""

    def __init__(self, d_model: int, n_batches: int, n_layers: int = 3):
        super().__init__(d_model, n_batches, n_layers, nn.LeakyReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(grad_reverse(x))  # (B, n_batches)


class ScGPT(nn.Module):
    """Gene + value (+ condition) embeddings -> transformer -> cell embedding and the objective heads."""

    def __init__(self, cfg: ModelConfig, n_tokens: int, pad_id: int):
        super().__init__()
        needs_batches = (
            cfg.use_batch_labels
            or cfg.domain_spec_batchnorm == "dsbn"
            or cfg.do_dab
            or cfg.cce_batch_offset
        )
        if needs_batches and cfg.n_batches < 1:
            raise ValueError(
                "model.use_batch_labels / domain_spec_batchnorm=dsbn / do_dab / cce_batch_offset need "
                "model.n_batches >= 1 (filled in from the data)"
            )
        self.cfg = cfg
        self.n_tokens = n_tokens
        self.pad_id = pad_id
        d = cfg.d_model
        self.encoder = GeneEncoder(n_tokens, d, pad_id)
        if cfg.input_emb_style == "continuous":
            self.value_encoder = ContinuousValueEncoder(d, cfg.dropout, cfg.max_value)
        elif cfg.input_emb_style == "category":
            self.value_encoder = CategoryValueEncoder(cfg.n_bins, d)
        else:  # scaling: the gene embedding is multiplied by the value
            self.value_encoder = nn.Identity()
        if cfg.use_batch_labels:
            self.batch_encoder = BatchLabelEncoder(cfg.n_batches, d)
        if cfg.use_modality:
            self.modality_encoder = BatchLabelEncoder(cfg.n_modalities, d)
        if cfg.use_perturbation:
            self.pert_encoder = nn.Embedding(3, d, padding_idx=PERT_PAD_ID)
        if cfg.domain_spec_batchnorm == "dsbn":
            self.dsbn = DomainSpecificBatchNorm1d(d, cfg.n_batches)
        elif cfg.domain_spec_batchnorm == "batchnorm":
            self.bn = nn.BatchNorm1d(d, eps=6.1e-5)
        self.transformer_encoder = TransformerEncoder(cfg)
        d_cell = 2 * d if cfg.use_batch_labels else d
        self.decoder = ExprDecoder(d_cell, d, cfg.explicit_zero_prob)
        if cfg.n_cls > 0:
            self.cls_decoder = ClsDecoder(d, cfg.n_cls, cfg.nlayers_cls, nn.ReLU)
        if cfg.do_mvc:
            self.mvc_decoder = MVCDecoder(d, d_cell, cfg.explicit_zero_prob)
        if cfg.do_dab:
            self.grad_reverse_discriminator = AdversarialDiscriminator(d, cfg.n_batches)
        if cfg.cce_batch_offset:
            self.cce_batch_offset = nn.Embedding(cfg.n_batches, d)  # (n_batches, D)
            nn.init.zeros_(self.cce_batch_offset.weight)
        self.init_weights()

    def init_weights(self) -> None:
        """Initial weights in the configured `init` style (see `ModelConfig.init`)."""
        style = self.cfg.init
        if style == "torch":
            return
        normed = (GeneEncoder, CategoryValueEncoder, BatchLabelEncoder)  # a LayerNorm follows
        tables = (
            [m.embedding for m in self.modules() if isinstance(m, normed)]
            if style == "small"
            else [self.encoder.embedding]
        )
        with torch.no_grad():
            for table in tables:
                table.weight.uniform_(-0.1, 0.1)
                if table.padding_idx is not None:
                    table.weight[table.padding_idx].zero_()

    # ------------------------------------------------------------------------------------------- encoding

    def _encode_packed(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        packing: Packing,
        batch: torch.Tensor | None,
        modality: torch.Tensor | None,
        perturbation: torch.Tensor | None,
        gen: torch.Tensor | None,
        cell_prompt: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer output (T, D) and gene token embeddings (T, D) of the packed tokens."""
        cfg = self.cfg
        gene_embs = self.encoder(packing.pack(genes))  # (T, D)
        vals = packing.pack(values)  # (T,)
        if cfg.input_emb_style == "scaling":
            x = gene_embs * vals.unsqueeze(-1).to(gene_embs.dtype)  # (T, D)
        else:
            x = gene_embs + self.value_encoder(vals)  # (T, D)
        if cfg.use_perturbation:
            if perturbation is None:
                raise ValueError("this model uses perturbation flags; pass `perturbation`")
            x = x + self.pert_encoder(packing.pack(perturbation).long())  # (T, D)
        if cfg.use_modality:
            if modality is None:
                raise ValueError("this model uses modality tokens; pass `modality`")
            mod = modality.long()  # (B,) per cell or (B, L) per token
            mod = packing.pack(mod) if mod.dim() == 2 else mod[packing.seq_id]  # (T,)
            x = x + self.modality_encoder(mod)  # (T, D)
        if cfg.domain_spec_batchnorm == "dsbn":
            if batch is None:
                raise ValueError("this model uses domain-specific batch norm; pass `batch`")
            x = self.dsbn(x, batch[packing.seq_id])  # (T, D)
        elif cfg.domain_spec_batchnorm == "batchnorm":
            x = self.bn(x)  # (T, D)
        if (
            cell_prompt is not None
        ):  # cell-prompt generation: the <cls> input is a given cell embedding
            x = x.index_copy(0, packing.first, cell_prompt.to(x.dtype))  # (T, D)
        return self.transformer_encoder(x, packing, gen), gene_embs

    def _cell_emb(self, h: torch.Tensor, packing: Packing, weights: torch.Tensor) -> torch.Tensor:
        """Cell embedding (B, D) from packed outputs h (T, D); `weights` (T,) are the input values."""
        style = self.cfg.cell_emb_style
        if style == "cls":
            return h[packing.first]  # (B, D)
        b = packing.batch_size
        if style == "avg-pool":
            lens = torch.tensor(packing.lengths, device=h.device, dtype=h.dtype).clamp(min=1)
            return h.new_zeros(b, h.shape[1]).index_add(0, packing.seq_id, h) / lens[:, None]
        pooled = h.new_zeros(b, h.shape[1]).index_add(
            0, packing.seq_id, h * weights.to(h.dtype)[:, None]
        )  # (B, D)
        return F.normalize(pooled, p=2, dim=1)

    def encode(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        key_padding_mask: torch.Tensor,
        batch: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        perturbation: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer output (B, L, D) and the gene token embeddings (B, L, D); zeros at padding."""
        packing = Packing.from_padding(key_padding_mask)
        h, gene_embs = self._encode_packed(
            genes, values, packing, batch, modality, perturbation, None, None
        )
        return packing.unpack(h), packing.unpack(gene_embs)

    def cell_embedding(
        self,
        h: torch.Tensor,
        values: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cell embedding (B, D) from `encode`'s output h (B, L, D) in the configured style."""
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        if values is None:
            if self.cfg.cell_emb_style == "w-pool":
                raise ValueError("cell_emb_style w-pool weighs by the values; pass `values`")
            values = torch.zeros(h.shape[:2], device=h.device)
        packing = Packing.from_padding(key_padding_mask)
        return self._cell_emb(packing.pack(h), packing, packing.pack(values))

    # ------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        key_padding_mask: torch.Tensor,
        batch: torch.Tensor | None = None,
        *,
        modality: torch.Tensor | None = None,
        perturbation: torch.Tensor | None = None,
        gen_mask: torch.Tensor | None = None,
        cell_prompt: torch.Tensor | None = None,
        cce: bool = False,
        query_genes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the model on a padded batch.

        genes, values, key_padding_mask (True at padding): (B, L). batch: (B,) per-cell labels; modality:
        (B,) per cell or (B, L) per token; perturbation: (B, L) flags. gen_mask: (B, L) True at unknown
        genes, which then attend to the known genes and themselves only (generative attention). cell_prompt:
        (B, D) replaces the `<cls>` input (cell-prompt generation). cce: also return `cell_emb2`, a second
        dropout view for CCE. query_genes: (B, Q) gene ids (padding allowed) whose values GEPC predicts from
        the cell embedding, returned as `gepc_query` (B, Q); they need not be in the input (GEPC-hidden).

        Returns `cell_emb` (B, D), `gep` (B, L) and, when built, `gepc` (B, L), `gep_zero_prob` /
        `gepc_zero_prob` (B, L), `cls_logits` (B, n_cls), `dar_logits` (B, n_batches). Padding positions hold 0.
        """
        cfg = self.cfg
        packing = Packing.from_padding(key_padding_mask)
        gen = packing.pack(gen_mask.bool()) if gen_mask is not None else None  # (T,)
        args = (genes, values, packing, batch, modality, perturbation)
        h, gene_embs = self._encode_packed(*args, gen, cell_prompt)  # (T, D)
        vals = packing.pack(values)  # (T,)
        cell_emb = self._cell_emb(h, packing, vals)  # (B, D)
        out = {"cell_emb": cell_emb}
        if cfg.use_batch_labels:
            if batch is None:
                raise ValueError("this model uses batch labels; pass `batch`")
            batch_emb = self.batch_encoder(batch)  # (B, D)
            h_dec = torch.cat([h, batch_emb[packing.seq_id]], dim=1)  # (T, 2D)
            cell_rep = torch.cat([cell_emb, batch_emb], dim=1)  # (B, 2D)
        else:
            h_dec, cell_rep = h, cell_emb
        dec = self.decoder(h_dec)
        out["gep"] = packing.unpack(dec["pred"])  # (B, L)
        if cfg.explicit_zero_prob:
            out["gep_zero_prob"] = packing.unpack(dec["zero_probs"])  # (B, L)
        if cfg.do_mvc:
            mvc = self.mvc_decoder(cell_rep[packing.seq_id], gene_embs)
            out["gepc"] = packing.unpack(mvc["pred"])  # (B, L)
            if cfg.explicit_zero_prob:
                out["gepc_zero_prob"] = packing.unpack(mvc["zero_probs"])  # (B, L)
            if query_genes is not None:
                q = self.encoder(query_genes)  # (B, Q, D)
                rep = cell_rep[:, None, :].expand(-1, q.shape[1], -1)  # (B, Q, D_cell)
                mvc_q = self.mvc_decoder(rep, q)
                out["gepc_query"] = mvc_q["pred"]  # (B, Q)
                if cfg.explicit_zero_prob:
                    out["gepc_query_prob"] = mvc_q["zero_probs"]  # (B, Q) P(expressed)
        elif query_genes is not None:
            raise ValueError("query_genes needs the GEPC decoder (model.do_mvc)")
        if cfg.n_cls > 0:
            out["cls_logits"] = self.cls_decoder(cell_emb)  # (B, n_cls)
        if cfg.do_dab:
            out["dar_logits"] = self.grad_reverse_discriminator(cell_emb)  # (B, n_batches)
        if cce:
            h2, _ = self._encode_packed(*args, gen, cell_prompt)  # (T, D)
            out["cell_emb2"] = self._cell_emb(h2, packing, vals)  # (B, D)
        return out

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count; `embeddings=False` leaves out the embedding tables (gene, category value,
        batch, modality, perturbation): Kaplan et al.'s N, as the scale ablation reports it."""
        total = sum(p.numel() for p in self.parameters())
        if embeddings:
            return total
        tables = (m for m in self.modules() if isinstance(m, nn.Embedding))
        return total - sum(p.numel() for m in tables for p in m.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Approximate training FLOPs per token (6 x matmul params + attention), for MFU estimates."""
        d, n_layers = self.cfg.d_model, self.cfg.n_layers
        matmul = n_layers * (4 * d * d + 2 * d * self.cfg.d_hid)
        return 6.0 * matmul + 12.0 * n_layers * d * seq_len


def build_model(cfg: ModelConfig, n_tokens: int, pad_id: int) -> ScGPT:
    return ScGPT(cfg, n_tokens, pad_id)

"""The scGPT model: embeddings and the encoder stack (`layers.py`, attention in `attention.py`), then the heads
(`heads.py`), assembled in `ScGPT`; `build_model` makes one from a `ModelConfig`.

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

from scgpt_dist.model.config import ModelConfig
from scgpt_dist.model.heads import AdversarialDiscriminator, ClsDecoder, ExprDecoder, MVCDecoder
from scgpt_dist.model.layers import (
    BatchLabelEncoder,
    CategoryValueEncoder,
    ContinuousValueEncoder,
    DomainSpecificBatchNorm1d,
    GeneEncoder,
    TransformerEncoder,
)
from scgpt_dist.model.packing import Packing

PERT_PAD_ID = 2
"""Perturbation-flag code for padding (0 = not perturbed, 1 = perturbed), as in the reference."""


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

"""The output heads: expression (GEP), cell-conditioned expression (GEPC / MVC), cell-type classifier (CLS)
and the adversarial batch discriminator (DAR) behind a gradient-reversal layer."""

from __future__ import annotations

import torch
import torch.nn as nn


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

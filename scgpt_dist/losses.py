"""Pretraining objectives, each a separate function, and their weighted sum."""

from __future__ import annotations

import torch

from scgpt_dist.config import ObjectiveConfig


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over positions where `mask` is True. pred, target, mask: (B, L)."""
    mask = mask.to(pred.dtype)
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def gep_loss(
    out: dict[str, torch.Tensor], target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GEP: regress the masked genes' values from their transformer outputs."""
    return masked_mse(out["gep"], target, mask)


def gepc_loss(
    out: dict[str, torch.Tensor], target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GEPC / MVC: regress the masked genes' values from the cell embedding."""
    return masked_mse(out["gepc"], target, mask)


OBJECTIVES = {"gep": gep_loss, "gepc": gepc_loss}


def total_loss(
    out: dict[str, torch.Tensor], target: torch.Tensor, mask: torch.Tensor, cfg: ObjectiveConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of enabled objectives, and each one's value (detached) for logging."""
    parts = {}
    total = torch.zeros((), dtype=target.dtype, device=target.device)
    for name, fn in OBJECTIVES.items():
        weight = getattr(cfg, name)
        if weight:
            value = fn(out, target, mask)
            parts[name] = value.detach()
            total = total + weight * value
    return total, parts

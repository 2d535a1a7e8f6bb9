"""Pretraining objectives: each a loss function and one entry of `REGISTRY`, and their weighted sum.

Formulas follow the scGPT reference (`scgpt/loss.py` and `TransformerModel.forward`): GEP and GEPC are masked
MSEs, their explicit-zero variants masked Bernoulli NLLs of "value > 0", ECS is
`mean(1 - (relu(cos) - threshold)^2)` over off-diagonal pairs (diagonal zeroed), CCE a SimCSE-style
cross-entropy over cosine similarities / temperature, DAR and CLS cross-entropies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only
    from scgpt_dist.model.config import ModelConfig, ObjectiveConfig


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over positions where `mask` is True. pred, target, mask: (B, L)."""
    mask = mask.to(pred.dtype)
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def masked_bernoulli_nll(
    prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean negative log-likelihood of `target > 0` under Bernoulli(prob) where `mask`. All (B, L)."""
    mask = mask.to(prob.dtype)
    nll = F.binary_cross_entropy(
        prob.clamp(0.0, 1.0), (target > 0).to(prob.dtype), reduction="none"
    )
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


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


def gep_zero_loss(
    out: dict[str, torch.Tensor], target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Explicit zero probability of GEP: Bernoulli NLL of each masked gene being expressed."""
    return masked_bernoulli_nll(out["gep_zero_prob"], target, mask)


def gepc_zero_loss(
    out: dict[str, torch.Tensor], target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Explicit zero probability of GEPC: Bernoulli NLL from the cell embedding."""
    return masked_bernoulli_nll(out["gepc_zero_prob"], target, mask)


def gepc_hidden_loss(out: dict[str, torch.Tensor], target_kind: str = "value") -> torch.Tensor:
    """GEPC-hidden on genes the cell embedding never saw: masked MSE of their values (`gepc_query`) or
    masked Bernoulli NLL of their presence in the cell's input (`gepc_query_prob`, GEPC's explicit-zero
    head); targets and mask `gepc_query_target`, `gepc_query_mask`. All (B, Q); see
    train_module.hidden_queries."""
    target, mask = out["gepc_query_target"], out["gepc_query_mask"]
    if target_kind == "value":
        return masked_mse(out["gepc_query"], target, mask)
    if "gepc_query_prob" not in out:
        raise ValueError("objectives.gepc_hidden_target=presence needs model.explicit_zero_prob")
    return masked_bernoulli_nll(out["gepc_query_prob"], target, mask)


def cell_prompt_loss(
    out: dict[str, torch.Tensor], target: torch.Tensor, gen_mask: torch.Tensor
) -> torch.Tensor:
    """Cell-prompt generation: regress every unknown gene's value (`gen_mask`, (B, L)) from the second,
    cell-prompted pass (`out["cell_prompt_gep"]`, (B, L))."""
    return masked_mse(out["cell_prompt_gep"], target, gen_mask)


def ecs_loss(cell_emb: torch.Tensor, threshold: float) -> torch.Tensor:
    """Elastic cell similarity (reference formula) on cell embeddings (B, D)."""
    normed = F.normalize(cell_emb, p=2, dim=1)  # (B, D)
    cos = normed @ normed.t()  # (B, B)
    eye = torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)
    cos = F.relu(cos.masked_fill(eye, 0.0))
    return torch.mean(1 - (cos - threshold) ** 2)


def cce_loss(
    cell_emb: torch.Tensor,
    cell_emb2: torch.Tensor,
    temp: float,
    offset: int = 0,
) -> torch.Tensor:
    """Contrastive cell embedding: each cell's two views are positives, other cells negatives.

    cell_emb: (B, D) the anchors; cell_emb2: (N, D) the candidates, N >= B, where anchor i's positive is
    row `offset + i` (N = B, offset 0 within one micro-batch; the global batch with `gather_rows`).
    """
    sim = F.cosine_similarity(cell_emb[:, None, :], cell_emb2[None, :, :], dim=-1) / temp  # (B, N)
    target = torch.arange(sim.shape[0], device=sim.device) + offset
    return F.cross_entropy(sim, target)


class _AllGather(torch.autograd.Function):
    """all_gather of equal-shaped tensors whose backward returns to each rank the gradient that every
    rank's loss sends to its rows (the sum over ranks of the gathered tensor's gradient, at its rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every data-parallel rank's rows of x (B_r, D), in rank order, and where this rank's rows start.

    Differentiable: the gradient reaching another rank's copy flows back to that rank. Ranks may hold
    different numbers of rows (the sizes are gathered first). Without an initialised process group of
    several ranks, x itself and offset 0.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[0]))
    parts = _AllGather.apply(padded).split(max(counts))
    rows = torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
    return rows, sum(counts[:rank])


def dar_loss(dar_logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Domain adaptation by reverse backprop: batch classification behind gradient reversal. (B, n), (B,)."""
    return F.cross_entropy(dar_logits, batch.long())


def cls_loss(cls_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cell-type classification; labels < 0 (unlabelled cells) are ignored. (B, n_cls), (B,)."""
    labels = labels.long()
    if not bool((labels >= 0).any()):
        return cls_logits.sum() * 0.0
    return F.cross_entropy(cls_logits, labels, ignore_index=-1)


@dataclass(frozen=True)
class LossInputs:
    """What an objective's loss reads. out: the model's outputs; target, mask: (B, L) true values and
    GEP-masked positions; batch, labels: (B,) batch and cell-type codes; cell_prompt_mask: (B, L) the genes
    the cell-prompt pass generates; gather: CCE takes its negatives from every data-parallel rank."""

    out: dict[str, torch.Tensor]
    target: torch.Tensor
    mask: torch.Tensor
    cfg: ObjectiveConfig
    batch: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    cell_prompt_mask: torch.Tensor | None = None
    gather: bool = False


@dataclass(frozen=True)
class Objective:
    """One pretraining / finetuning objective. Its weight is `ObjectiveConfig.<name>` (0 turns it off).

    loss: its value on one micro-batch. needs: what the model must have for it, as the unmet `model.*`
    setting (None when the model has it); checked when a config is validated and before finetuning.
    masked: it trains on the GEP-masked positions (the finetune loop masks values only for these).
    """

    name: str
    loss: Callable[[LossInputs], torch.Tensor]
    needs: Callable[[ModelConfig, ObjectiveConfig], str | None] = lambda model, obj: None
    masked: bool = False


def _require(out: dict, key: str, what: str) -> None:
    if key not in out:
        raise ValueError(f"{what}; see train_module.compute_loss")


def _gepc_hidden(x: LossInputs) -> torch.Tensor:
    _require(
        x.out,
        "gepc_query",
        "objectives.gepc_hidden needs the hidden-gene queries (out['gepc_query'])",
    )
    return gepc_hidden_loss(x.out, x.cfg.gepc_hidden_target)


def _gen_cell_prompt(x: LossInputs) -> torch.Tensor:
    if "cell_prompt_gep" not in x.out or x.cell_prompt_mask is None:
        raise ValueError(
            "objectives.gen_cell_prompt needs the cell-prompt pass's predictions "
            "(out['cell_prompt_gep']) and its mask; see train_module.compute_loss"
        )
    return cell_prompt_loss(x.out, x.target, x.cell_prompt_mask)


def _cce(x: LossInputs) -> torch.Tensor:
    out, cfg = x.out, x.cfg
    # objectives.cce_view split or thinned: the views come from train_module.compute_loss
    if "cce_view1" in out:
        one, two = out["cce_view1"], out["cce_view2"]
    elif "cell_emb2" in out:
        one, two = out["cell_emb"], out["cell_emb2"]
    else:
        raise ValueError(
            "objectives.cce needs two views: the model run with cce=True, or "
            "out['cce_view1'] / out['cce_view2'] (see train_module.compute_loss)"
        )
    all_one, all_two, offset = one, two, 0
    if x.gather:  # both views in one tensor: one collective per step, not one each
        rows, offset = gather_rows(torch.cat([one, two], 1))
        all_one, all_two = rows.split(one.shape[1], 1)
    value = cce_loss(one, all_two, cfg.cce_temp, offset)
    if cfg.cce_view == "thinned":  # both directions, as neither view is the anchor
        value = 0.5 * (value + cce_loss(two, all_one, cfg.cce_temp, offset))
    return value


def _dar(x: LossInputs) -> torch.Tensor:
    if x.batch is None:
        raise ValueError("objectives.dar needs the batch labels")
    return dar_loss(x.out["dar_logits"], x.batch)


def _cls(x: LossInputs) -> torch.Tensor:
    if x.labels is None:
        raise ValueError("objectives.cls needs the cell-type labels")
    return cls_loss(x.out["cls_logits"], x.labels)


def _mvc(model: ModelConfig, obj: ObjectiveConfig) -> str | None:
    return None if model.do_mvc else "do_mvc"


def _zero_prob(model: ModelConfig, obj: ObjectiveConfig) -> str | None:
    return None if model.explicit_zero_prob else "explicit_zero_prob"


def _gepc_hidden_needs(model: ModelConfig, obj: ObjectiveConfig) -> str | None:
    presence = obj.gepc_hidden_target == "presence"
    if model.do_mvc and (model.explicit_zero_prob or not presence):
        return None
    return "do_mvc" + (" and model.explicit_zero_prob" if presence else "")


REGISTRY: tuple[Objective, ...] = (
    Objective("gep", lambda x: gep_loss(x.out, x.target, x.mask), masked=True),
    Objective("gepc", lambda x: gepc_loss(x.out, x.target, x.mask), _mvc, masked=True),
    Objective(
        "gep_zero", lambda x: gep_zero_loss(x.out, x.target, x.mask), _zero_prob, masked=True
    ),
    Objective(
        "gepc_zero",
        lambda x: gepc_zero_loss(x.out, x.target, x.mask),
        lambda m, o: _zero_prob(m, o) or _mvc(m, o),
        masked=True,
    ),
    Objective("gepc_hidden", _gepc_hidden, _gepc_hidden_needs),
    Objective("gen_cell_prompt", _gen_cell_prompt),
    Objective("ecs", lambda x: ecs_loss(x.out["cell_emb"], x.cfg.ecs_threshold)),
    Objective("cce", _cce),
    Objective("dar", _dar, lambda m, o: None if m.do_dab else "do_dab"),
    Objective("cls", _cls, lambda m, o: None if m.n_cls > 0 else "n_cls"),
)
"""Every objective, in the order the total adds them. Adding one: its loss function, an entry here and
its weight in `ObjectiveConfig`."""

OBJECTIVES = tuple(o.name for o in REGISTRY)
"""Objective names; each is a weight in `ObjectiveConfig`."""


def enabled(cfg: ObjectiveConfig) -> list[Objective]:
    """The objectives with a non-zero weight, in registry order."""
    return [o for o in REGISTRY if getattr(cfg, o.name)]


def model_problems(model: ModelConfig, cfg: ObjectiveConfig) -> list[str]:
    """One message per enabled objective the model cannot train (empty when all can)."""
    problems = []
    for o in enabled(cfg):
        missing = o.needs(model, cfg)
        if missing:
            problems.append(
                f"objectives.{o.name} > 0 needs model.{missing} set; set it or objectives.{o.name}=0"
            )
    return problems


def total_loss(
    out: dict[str, torch.Tensor],
    target: torch.Tensor,
    mask: torch.Tensor,
    cfg: ObjectiveConfig,
    batch: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    cell_prompt_mask: torch.Tensor | None = None,
    gather: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled objectives, and each one's value (detached) for logging.

    Arguments as `LossInputs`; with gather, CCE is a collective: every rank must call it (training steps).
    """
    x = LossInputs(out, target, mask, cfg, batch, labels, cell_prompt_mask, gather)
    parts: dict[str, torch.Tensor] = {}
    total = torch.zeros((), dtype=target.dtype, device=target.device)
    for objective in enabled(cfg):
        value = objective.loss(x)
        parts[objective.name] = value.detach()
        total = total + getattr(cfg, objective.name) * value
    return total, parts

"""Finetuning a pretrained model on a small labelled data set (one process, a Ray task in `jobs.finetune`).

- `adapt_model`: a copy of a pretrained model with a changed head set (CLS classes, batch count, DAR, DSBN,
  modality / perturbation tokens) and, optionally, a grown vocabulary, carrying every pretrained weight whose
  name and shape still match.
- `train_epochs`: the one finetuning loop (AdamW, step decay, clipping, per-epoch means) every task uses.
- `finetune`: `train_epochs` over a token table with any weighted mix of objectives (CLS, GEP, GEPC, ECS, DAR,
  CCE).
- `run_model`: eval-mode cell embeddings (and class logits) of a token table in row order; `with_labels` sets
  a table's label / batch codes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from data_ingest import keys
from data_ingest.vocab import GeneVocab
from scgpt_dist.model.collate import Batch, collate, mask_values
from scgpt_dist.model.config import ModelConfig, ObjectiveConfig
from scgpt_dist.model.losses import enabled as enabled_objectives
from scgpt_dist.model.losses import model_problems, total_loss
from scgpt_dist.model.transformer import ScGPT, build_model
from scgpt_dist.train.checkpoint import LoadedModel
from scgpt_dist.train.warmstart import GENE_EMBEDDING, check_stable_extension, grow_gene_rows

log = logging.getLogger(__name__)


def adapt_model(
    loaded: LoadedModel,
    from_scratch: bool = False,
    seed: int = 0,
    vocab: GeneVocab | None = None,
    new_token_noise: float = 0.1,
    **changes,
) -> tuple[ScGPT, list[str]]:
    """A new model with `loaded`'s config updated by `changes` (ModelConfig fields, e.g. n_cls=10,
    n_batches=3, do_dab=True, domain_spec_batchnorm="dsbn", use_modality=True), over `vocab` when given (an
    extension of `loaded.vocab`, e.g. `warmstart.extended_vocab(loaded.vocab, proteins)`).

    Pretrained weights are copied wherever the parameter name and shape match; a grown vocabulary keeps every
    pretrained gene row and starts new tokens as continued pretraining does (`warmstart.grow_gene_rows`:
    the mean gene row plus `new_token_noise` x its spread). Returns (model, names of the freshly initialised
    tensors). `from_scratch=True` copies nothing (the paper's from-scratch control).
    """
    cfg: ModelConfig = dataclasses.replace(copy.deepcopy(loaded.model.cfg), **changes)
    vocab = vocab or loaded.vocab
    if vocab is not loaded.vocab:
        check_stable_extension(loaded.vocab, vocab)
    torch.manual_seed(seed)
    model = build_model(cfg, len(vocab), vocab.pad_id)
    if from_scratch:
        return model, sorted(model.state_dict())
    pretrained = loaded.model.state_dict()
    state = model.state_dict()
    fresh = []
    for name, tensor in state.items():
        src = pretrained.get(name)
        if name == GENE_EMBEDDING and len(vocab) > len(loaded.vocab):
            gen = torch.Generator().manual_seed(seed)
            state[name] = grow_gene_rows(src, tensor, len(loaded.vocab), new_token_noise, gen)
            log.info("adapt_model: vocabulary %d -> %d tokens", len(loaded.vocab), len(vocab))
        elif src is not None and src.shape == tensor.shape:
            state[name] = src.clone()
        else:
            fresh.append(name)
    model.load_state_dict(state)
    if fresh:
        log.info("adapt_model: %d tensors initialised fresh (e.g. %s)", len(fresh), fresh[:4])
    return model, fresh


@dataclass
class LoopConfig:
    """The optimisation every finetuning run shares: AdamW, a per-epoch step decay, gradient clipping."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    """AdamW learning rate (reference finetuning uses 1e-4)."""
    weight_decay: float = 0.0
    schedule_gamma: float = 0.9
    """Learning rate multiplied by this after each epoch (reference StepLR, step 1)."""
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class FinetuneConfig(LoopConfig):
    """Finetuning on a token table with a weighted mix of objectives."""

    objectives: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig(gep=0.0, gepc=0.0, cls=1.0)
    )
    """Weights of the finetuning objectives (default: CLS only, as for annotation)."""
    freeze_encoder: bool = False
    """Train only the heads (gene/value embeddings and transformer frozen)."""


def train_epochs(
    model: torch.nn.Module,
    cfg: LoopConfig,
    epoch_batches: Callable[[int], Iterable[Any]],
    loss_of: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    name: str = "finetune",
) -> list[dict[str, float]]:
    """The single-process finetuning loop every task uses: for each epoch, the batches `epoch_batches(epoch)`
    yields, `loss_of(batch) -> (loss, parts)`, backward, clip, AdamW step; the learning rate decays by
    `cfg.schedule_gamma` per epoch. Returns per-epoch means of `loss` and the parts; `on_epoch(epoch, means)`
    after each epoch. Trains the parameters that require gradients; leaves the model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.schedule_gamma)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        n = 0
        for batch in epoch_batches(epoch):
            loss, parts = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if n % 50 == 0:
                log.info("%s epoch %d step %d loss=%.4f", name, epoch + 1, n, sums["loss"] / n)
        sched.step()
        means = {k: v / max(n, 1) for k, v in sums.items()}
        history.append(means)
        log.info(
            "%s epoch %d/%d %s",
            name,
            epoch + 1,
            cfg.epochs,
            " ".join(f"{k}={v:.4f}" for k, v in means.items()),
        )
        if on_epoch is not None:
            on_epoch(epoch, means)
    model.eval()
    return history


def _model_inputs(model: ScGPT, b: Batch) -> dict:
    cfg = model.cfg
    kw = {}
    if cfg.use_batch_labels or cfg.domain_spec_batchnorm == "dsbn" or cfg.do_dab:
        kw["batch"] = b.batch.clamp(0, max(cfg.n_batches - 1, 0))
    if cfg.use_modality:
        kw["modality"] = b.modality
    if cfg.use_perturbation:
        kw["perturbation"] = b.perturbation
    return kw


def finetune(
    model: ScGPT,
    table: pa.Table,
    cfg: FinetuneConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place on `table` (token records with `label` / `batch` as the objectives need) with
    `cfg.objectives` through `train_epochs`. Returns per-epoch mean losses."""
    obj = cfg.objectives
    problems = model_problems(model.cfg, obj)
    if problems:  # adapt_model adds the heads (n_cls, do_dab, ...)
        raise ValueError(problems[0])
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.freeze_encoder:
        for name, p in model.named_parameters():
            if name.startswith(("encoder.", "value_encoder.", "transformer_encoder.")):
                p.requires_grad_(False)
    masking = any(o.masked for o in enabled_objectives(obj))

    def batches(epoch: int):
        order = torch.randperm(table.num_rows, generator=gen).numpy()
        for start in range(0, table.num_rows, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) >= 2:  # batch norm and ECS need two cells
                yield collate(table.take(pa.array(idx)), model.pad_id)

    def loss_of(b: Batch):
        if masking:
            inp, mask = mask_values(b.values, obj.mask_ratio, gen)
        else:
            inp, mask = b.values, b.values == keys.PAD_VALUE - 1  # all False
        out = model(b.genes, inp, b.padding, **_model_inputs(model, b), cce=bool(obj.cce))
        return total_loss(out, b.values, mask, obj, batch=b.batch, labels=b.label)

    return train_epochs(model, cfg, batches, loss_of, on_epoch)


@torch.no_grad()
def run_model(model: ScGPT, table: pa.Table, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Eval-mode outputs per cell in row order: `cell_emb` (N, D, L2-normalised) and, when the model has a
    CLS head, `cls_logits` (N, K)."""
    model.eval()
    embs, logits = [], []
    for start in range(0, table.num_rows, batch_size):
        b = collate(table.slice(start, batch_size), model.pad_id)
        out = model(b.genes, b.values, b.padding, **_model_inputs(model, b))
        embs.append(out["cell_emb"].float().numpy())
        if "cls_logits" in out:
            logits.append(out["cls_logits"].float().numpy())
    emb = np.concatenate(embs) if embs else np.zeros((0, model.cfg.d_model), np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    result = {"cell_emb": emb}
    if logits:
        result["cls_logits"] = np.concatenate(logits)
    return result


def with_labels(
    table: pa.Table, labels: np.ndarray | None = None, batches: np.ndarray | None = None
) -> pa.Table:
    """`table` with its `label` / `batch` columns replaced by integer codes (row order)."""
    for name, values in ((keys.LABEL, labels), (keys.BATCH, batches)):
        if values is None:
            continue
        col = pa.array(np.asarray(values, dtype=np.int32))
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, col)
        else:
            table = table.append_column(name, col)
    return table

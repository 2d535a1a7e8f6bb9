"""Warm start for continued pretraining (`jobs.repretrain`), and the one way a model's vocabulary grows
(`extended_vocab` + `grow_gene_rows`, also what `scgpt_dist.tasks.finetune.adapt_model` uses for new tokens):
grow a promoted model to a larger vocabulary and batch set, load those weights into a DeepSpeed engine, and pick new cells plus a replay sample of old ones.

How new rows are initialised (`warm_start_state`):

- **Gene embeddings** (`encoder.embedding.weight`): rows of genes the promoted model knows are copied (the
  vocabulary only appends, so their ids are unchanged); a new gene's row is the mean of the existing *gene*
  rows (special tokens excluded) plus Gaussian noise of `noise` x their per-dimension standard deviation,
  drawn from a seeded generator. A new gene starts as an "average gene" — the same input as any known gene
  would give on average — and the noise lets training tell new genes apart. (The reference scGPT drops genes
  its vocabulary lacks; it has no rule for growing one.)
- **Batch embeddings** (`batch_encoder.embedding.weight`): batch ids are the sorted dataset names, so adding a
  dataset can shift old ids; rows are mapped by *name*. A new dataset's row is the mean of the old rows.
  Per-batch modules (DSBN's BatchNorms, the DAR discriminator's output rows) are mapped by name as well;
  a new batch's DSBN starts from the mean of the old ones' parameters and statistics, a new discriminator
  output row from its fresh initialisation.
- Every other tensor must keep its shape and is copied unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_ingest import keys
from data_ingest.atomic import atomic_directory, write_text_atomic
from data_ingest.source import ResolvedSource, holdout_mask, open_experiment
from data_ingest.vocab import GeneVocab
from scgpt_dist.config import ExperimentConfig, ModelConfig, ReplayConfig, dump_config
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train.checkpoint import LoadedModel

log = logging.getLogger(__name__)

GENE_EMBEDDING = "encoder.embedding.weight"
BATCH_EMBEDDING = "batch_encoder.embedding.weight"
_DSBN = re.compile(r"^dsbn\.bns\.(\d+)\.(.+)$")
_DAR_OUT = (
    "grad_reverse_discriminator.out_layer.weight",
    "grad_reverse_discriminator.out_layer.bias",
)


def extended_vocab(old: GeneVocab, genes: Iterable[str]) -> tuple[GeneVocab, list[str]]:
    """A copy of `old` with the genes it lacks appended (existing ids unchanged); (vocab, added genes)."""
    vocab = GeneVocab(old.to_dict())
    return vocab, vocab.extend(genes)


def check_stable_extension(old: GeneVocab, new: GeneVocab) -> None:
    """Raise unless every token of `old` has the same id in `new` (so old weights stay meaningful)."""
    moved = [t for t, i in old.to_dict().items() if t not in new or new[t] != i]
    if moved:
        raise ValueError(
            f"{len(moved)} genes of the promoted model's vocabulary are missing or have other ids in the "
            f"new one (e.g. {moved[:3]}); extend the promoted vocab.json (GeneVocab.extend) instead of "
            "building a new vocabulary"
        )


@dataclass
class WarmStartReport:
    """What changed between the promoted model and the warm-started one."""

    new_genes: int = 0
    new_batches: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    """Tensors with no counterpart in the promoted model (kept at their fresh initialisation)."""


def warm_start_state(
    loaded: LoadedModel,
    vocab: GeneVocab,
    model_cfg: ModelConfig,
    batch_categories: list[str],
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], WarmStartReport]:
    """Weights for a model of `model_cfg` over `vocab` and `batch_categories`, from the promoted `loaded`
    (see the module docstring for how new rows are filled). `noise=0` gives the promoted model's exact
    behaviour on known genes and batches, with average rows for new ones."""
    check_stable_extension(loaded.vocab, vocab)
    old_batches = list(loaded.meta.get("data", {}).get("batch_categories") or [])
    n_old_batches = loaded.model.cfg.n_batches
    if not old_batches:
        if n_old_batches and n_old_batches != len(batch_categories):
            raise ValueError(
                "the promoted model's meta.json records no batch categories and its batch count differs "
                f"({n_old_batches} vs {len(batch_categories)}); warm start cannot map batch rows"
            )
        old_batches = list(batch_categories[:n_old_batches])
    torch.manual_seed(seed)
    target = build_model(model_cfg, len(vocab), vocab.pad_id).state_dict()
    source = loaded.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    report = WarmStartReport(new_genes=len(vocab) - len(loaded.vocab))
    report.new_batches = [b for b in batch_categories if b not in old_batches]
    # new batch index -> old batch index (-1 for a new batch)
    batch_map = [old_batches.index(b) if b in old_batches else -1 for b in batch_categories]
    out: dict[str, torch.Tensor] = {}
    for name, fresh in target.items():
        old = source.get(name)
        if name == GENE_EMBEDDING:
            out[name] = grow_gene_rows(old, fresh, len(loaded.vocab), noise, gen)  # (V_new, D)
        elif name == BATCH_EMBEDDING or name in _DAR_OUT:
            out[name] = _map_batch_rows(old, fresh, batch_map, mean_for_new=name == BATCH_EMBEDDING)
        elif (m := _DSBN.match(name)) is not None:
            j = int(m.group(1))
            src = batch_map[j] if j < len(batch_map) else -1
            if src >= 0:
                out[name] = source[f"dsbn.bns.{src}.{m.group(2)}"].clone()
            else:
                rows = [source[f"dsbn.bns.{i}.{m.group(2)}"] for i in range(len(old_batches))]
                out[name] = _mean_like(rows, fresh)
        elif old is not None and old.shape == fresh.shape:
            out[name] = old.clone()
        else:
            out[name] = fresh
            report.fresh.append(name)
    if report.fresh:
        log.warning("warm start: %d tensors start fresh: %s", len(report.fresh), report.fresh[:5])
    return out, report


def grow_gene_rows(
    old: torch.Tensor | None, fresh: torch.Tensor, n_old: int, noise: float, gen: torch.Generator
) -> torch.Tensor:
    """The gene-embedding table for a grown vocabulary, `fresh`'s shape (V_new, D): the promoted `old` rows
    (V_old, D) first, then one row per new token: the mean of the old gene rows plus `noise` x their
    per-dimension standard deviation of seeded Gaussian noise. The project's one rule for new tokens
    (continued pretraining's new genes, the multi-omics task's proteins)."""
    if old is None or old.shape[0] != n_old or old.shape[1:] != fresh.shape[1:]:
        raise ValueError(
            f"the promoted model's gene embedding has shape {None if old is None else tuple(old.shape)}; "
            f"expected ({n_old}, {fresh.shape[1]}) for its vocabulary"
        )
    genes = old[len(keys.SPECIAL_TOKENS) :]  # (V_old - 3, D): gene rows only
    mean = genes.mean(0)  # (D,)
    std = genes.std(0) if len(genes) > 1 else torch.zeros_like(mean)  # (D,)
    n_new = fresh.shape[0] - n_old
    new_rows = mean + noise * std * torch.randn(n_new, fresh.shape[1], generator=gen)  # (V_add, D)
    return torch.cat([old, new_rows.to(old.dtype)])  # (V_new, D)


def _map_batch_rows(
    old: torch.Tensor | None, fresh: torch.Tensor, batch_map: list[int], mean_for_new: bool
) -> torch.Tensor:
    if old is None:
        return fresh
    out = fresh.clone()
    for j, i in enumerate(batch_map):
        if i >= 0:
            out[j] = old[i]
        elif mean_for_new:
            out[j] = old.mean(0)
    return out


def _mean_like(rows: list[torch.Tensor], fresh: torch.Tensor) -> torch.Tensor:
    if not rows:
        return fresh
    if rows[0].is_floating_point():
        return torch.stack(rows).mean(0)
    return rows[0].clone()  # integer buffers (num_batches_tracked)


def write_model_dir(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    cfg: ExperimentConfig,
    vocab: GeneVocab,
    meta: dict,
) -> Path:
    """A consolidated model directory (`model.safetensors`, `config.yaml`, `vocab.json`, `meta.json`),
    written atomically: it exists complete or not at all."""
    import json

    from safetensors.torch import save_file

    with atomic_directory(out_dir) as tmp:
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp / keys.MODEL_FILE),
            metadata={"format": "pt"},
        )
        write_text_atomic(tmp / keys.CONFIG_FILE, dump_config(cfg))
        vocab.save(tmp / keys.VOCAB_FILE)
        write_text_atomic(tmp / keys.META_FILE, json.dumps(meta, indent=1, default=str))
    return Path(out_dir)


# --------------------------------------------------------------------------------- inside the workers


def load_into_engine(engine, model_dir: str | Path) -> None:
    """Overwrite a freshly initialised DeepSpeed engine's weights with `model_dir/model.safetensors`.

    Works for ZeRO 0-3: under ZeRO-3 the partitioned parameters are gathered, written by rank 0 and
    re-partitioned; under ZeRO 1-3 the optimizer's fp32 master copies are then refreshed from the new
    weights (otherwise the first optimizer step would copy the random initialisation back). Every rank
    must call it (a collective under ZeRO-3).
    """
    import torch.distributed as dist
    from safetensors.torch import load_file

    path = Path(model_dir) / keys.MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"train.init_from={model_dir} has no {keys.MODEL_FILE}; pass a consolidated model directory"
        )
    state = load_file(str(path))
    module = engine.module
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    missing = sorted((set(params) | set(buffers)) - set(state))
    unexpected = sorted(set(state) - set(params) - set(buffers))
    if missing or unexpected:
        raise ValueError(
            f"train.init_from={model_dir} does not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); its config.yaml and vocab.json must be the run's"
        )
    for name, p in params.items():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"train.init_from: {name} has shape {tuple(state[name].shape)}, the model {shape}; "
                "the model config or vocabulary differs from the warm-start model's"
            )
    stage = engine.zero_optimization_stage()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    with torch.no_grad():
        if stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                if rank == 0:
                    for name, p in params.items():
                        p.data.copy_(state[name].to(p.dtype))
        else:
            for name, p in params.items():
                p.data.copy_(state[name].to(p.dtype))
        for name, b in buffers.items():
            b.copy_(state[name].to(b.dtype))
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


# ------------------------------------------------------------------------------------------- replay


def replay_selection(resolved: ResolvedSource, replay: ReplayConfig) -> tuple[ResolvedSource, dict]:
    """Keep every training cell of the new datasets and a stable `replay.fraction` sample of the others.

    Returns the narrowed source and counts (new cells, replayed cells, old cells available)."""
    new = set(replay.new_datasets or [])
    joinids = resolved.joinids
    with open_experiment(resolved.soma_uri, resolved.tiledb_config) as exp:
        obs = (
            exp.obs.read(coords=(joinids,), column_names=[keys.SOMA_JOINID, resolved.batch_key])
            .concat()
            .to_pandas()
        )
    dataset = obs.set_index(keys.SOMA_JOINID)[resolved.batch_key].astype(str).reindex(joinids)
    is_new = dataset.isin(new).to_numpy()
    if not is_new.any():
        raise ValueError(
            f"none of the new datasets {sorted(new)[:5]} has training cells in {resolved.soma_uri} "
            f"(obs column {resolved.batch_key!r}); check data.replay.new_datasets and the obs filter"
        )
    old = joinids[~is_new]
    replayed = old[holdout_mask(old, replay.fraction, replay.seed)]
    keep = np.sort(np.concatenate([joinids[is_new], replayed]))
    counts = {"new_cells": int(is_new.sum()), "replay_cells": len(replayed), "old_cells": len(old)}
    log.info(
        "replay: %d new cells + %d of %d old cells (fraction %.2f)",
        counts["new_cells"],
        counts["replay_cells"],
        counts["old_cells"],
        replay.fraction,
    )
    return dataclasses.replace(resolved, joinids=keep), counts

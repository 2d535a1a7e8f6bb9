"""Checkpoint directories: naming, validation, discovery, consolidation and loading.

A training checkpoint is `checkpoints/step_<N>/` (written through Ray Train, which merges every rank's files):
DeepSpeed's shards under the tag folder `ds/`, plus `config.yaml`, `vocab.json` and `meta.json` from rank 0.
`meta.json` records the world size, so a directory missing a rank's shard is detected and skipped.
A consolidated model is `model.safetensors` + `config.yaml` + `vocab.json` (+ `meta.json`), written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from data_ingest import keys
from data_ingest.vocab import GeneVocab
from scgpt_dist.config import ExperimentConfig, from_dict

log = logging.getLogger(__name__)

DS_TAG = "ds"
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used, with the reason."""


def validate_checkpoint(path: str | Path) -> dict:
    """Return a complete checkpoint's meta, or raise `CheckpointError` naming what is missing."""
    path = Path(path)
    meta_path = path / keys.META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no {keys.META_FILE}; it was not completely written")
    meta = json.loads(meta_path.read_text())
    for name in (keys.CONFIG_FILE, keys.VOCAB_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} lacks {name}")
    tag_dir = path / DS_TAG
    world = int(meta["world_size"])
    shards = sorted(tag_dir.glob("*optim_states.pt"))
    if not (tag_dir / "mp_rank_00_model_states.pt").is_file() and not list(
        tag_dir.glob("*model_states.pt")
    ):
        raise CheckpointError(f"{path} lacks the DeepSpeed model states in {DS_TAG}/")
    if meta.get("zero_stage", 0) > 0 and len(shards) != world:
        raise CheckpointError(
            f"{path} has {len(shards)} optimizer shard(s) for world size {world}; a rank's shard is missing"
        )
    return meta


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete `step_*` checkpoint under `output_dir/checkpoints`, skipping broken ones."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    for cand in sorted(root.glob(f"{STEP_PREFIX}*"), reverse=True):
        try:
            validate_checkpoint(cand)
            return cand
        except (CheckpointError, json.JSONDecodeError, KeyError) as err:
            log.warning("skipping checkpoint %s: %s", cand, err)
    return None


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    return from_dict(ExperimentConfig, yaml.safe_load(Path(path).read_text()))


def consolidate(
    checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Gather any ZeRO stage's shards into one `model.safetensors` directory, atomically."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint)
    validate_checkpoint(checkpoint)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / keys.MODEL_FILE), metadata={"format": "pt"})
        for name in (keys.CONFIG_FILE, keys.VOCAB_FILE, keys.META_FILE):
            shutil.copy2(checkpoint / name, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ExperimentConfig
    vocab: GeneVocab
    meta: dict


def load_consolidated(model_dir: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a consolidated model directory (safetensors only; nothing is unpickled)."""
    from safetensors.torch import load_file

    from scgpt_dist.model import build_model

    model_dir = Path(model_dir)
    for name in (keys.MODEL_FILE, keys.CONFIG_FILE, keys.VOCAB_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir} lacks {name}; pass a consolidated model directory (the `model/` folder a "
                "pretraining run writes), or consolidate a checkpoint with `python -m jobs.consolidate`"
            )
    cfg = load_experiment_config(model_dir / keys.CONFIG_FILE)
    vocab = GeneVocab.load(model_dir / keys.VOCAB_FILE)
    meta_path = model_dir / keys.META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    model = build_model(cfg.model, len(vocab), vocab.pad_id)
    state = load_file(str(model_dir / keys.MODEL_FILE), device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{model_dir}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    return LoadedModel(model=model.to(device), config=cfg, vocab=vocab, meta=meta)

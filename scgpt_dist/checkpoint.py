"""Checkpoint directories: naming, validation, discovery, consolidation and loading.

A training checkpoint is `checkpoints/step_<N>/` (written through Ray Train, which merges every rank's files):
DeepSpeed's shards under the tag folder `ds/`, plus `config.yaml`, `vocab.json` and `meta.json` from rank 0.
Each rank also writes `manifest_rank_<r>.json` (size + sha256 of its files) after its shard; `meta.json` records
the world size, so a directory missing a rank's files, or with a truncated or corrupt file, is detected and
skipped in favour of the previous complete checkpoint.
A consolidated model is `model.safetensors` + `config.yaml` + `vocab.json` (+ `meta.json`), written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from data_ingest import keys
from data_ingest.atomic import atomic_directory, file_sha256
from data_ingest.vocab import GeneVocab, write_text_atomic
from scgpt_dist.config import ExperimentConfig, from_dict

log = logging.getLogger(__name__)

DS_TAG = "ds"
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used, with the reason."""


MANIFEST_PREFIX = "manifest_rank_"


def write_manifest(directory: str | Path, rank: int) -> Path:
    """Record size and sha256 of every file this rank wrote into `directory`; written last by each rank,
    so a manifest's presence means the rank's files are complete."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)
    }
    path = directory / f"{MANIFEST_PREFIX}{rank}.json"
    write_text_atomic(path, json.dumps({"rank": rank, "files": files}, indent=1))
    return path


def validate_checkpoint(path: str | Path, verify_checksums: bool = True) -> dict:
    """Return a complete checkpoint's meta, or raise `CheckpointError` naming what is wrong.

    Complete means: `meta.json` (rank 0), one manifest per rank of the world size recorded there, and every
    file a manifest lists present with its recorded size (and sha256, unless `verify_checksums=False`).
    """
    path = Path(path)
    meta_path = path / keys.META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no {keys.META_FILE}; it was not completely written")
    try:
        meta = json.loads(meta_path.read_text())
        world = int(meta["world_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}/{keys.META_FILE} is damaged ({err})") from err
    for rank in range(world):
        manifest_path = path / f"{MANIFEST_PREFIX}{rank}.json"
        if not manifest_path.is_file():
            raise CheckpointError(
                f"{path} lacks rank {rank}'s manifest; rank {rank}'s shard is missing or incomplete"
            )
        manifest = json.loads(manifest_path.read_text())
        for rel, info in manifest["files"].items():
            f = path / rel
            if not f.is_file():
                raise CheckpointError(
                    f"{path} lacks {rel} (written by rank {rank}); a shard is missing"
                )
            if f.stat().st_size != info["bytes"]:
                raise CheckpointError(f"{path}/{rel} has the wrong size; the file is truncated")
            if verify_checksums and file_sha256(f) != info["sha256"]:
                raise CheckpointError(
                    f"{path}/{rel} fails its sha256 checksum; the file is corrupt"
                )
    for name in (keys.CONFIG_FILE, keys.VOCAB_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} lacks {name}")
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


def prune_checkpoints(output_dir: str | Path, keep: int, keep_best: bool = True) -> list[Path]:
    """Delete all `step_*` directories but the newest `keep` and, with `keep_best`, the one with the lowest
    training loss recorded in its meta.json (complete or not otherwise); returns what was deleted.

    Called by rank 0 right after a checkpoint is committed, so the newest one is always complete.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    steps = sorted(root.glob(f"{STEP_PREFIX}*"))
    doomed = steps[: max(0, len(steps) - keep)] if keep > 0 else []
    if keep_best and doomed:
        best = min(steps, key=lambda p: _recorded_loss(p))
        doomed = [p for p in doomed if p != best]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _recorded_loss(path: Path) -> float:
    try:
        loss = json.loads((path / keys.META_FILE).read_text()).get("loss")
        return float("inf") if loss is None else float(loss)
    except (OSError, ValueError):
        return float("inf")


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
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / keys.MODEL_FILE), metadata={"format": "pt"})
        for name in (keys.CONFIG_FILE, keys.VOCAB_FILE, keys.META_FILE):
            shutil.copy2(checkpoint / name, tmp / name)
    return Path(out_dir)


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

"""Checkpoint directories: naming, validation, discovery, consolidation and loading.

A training checkpoint is `checkpoints/step_<N>/` (written through Ray Train, which merges every rank's files):
DeepSpeed's shards under the tag folder `ds/`, plus `config.yaml`, `vocab.json` and `meta.json` from rank 0.
Each rank also writes `manifest_rank_<r>.json` (size + sha256 of its files) after its shard; `meta.json` records
the world size, so a directory missing a rank's files, or with a truncated or corrupt file, is detected and
skipped in favour of the previous complete checkpoint.
The checkpoints live in the run's storage (`train.storage_path`: a local directory or an object-store URI, see
`scgpt_dist.train.storage`); validation, discovery and retention work on either, and consolidation and resume
download an object-store checkpoint to a temporary local directory first.
A consolidated model is `model.safetensors` + `config.yaml` + `vocab.json` (+ `meta.json`), written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from data_ingest import keys
from data_ingest.atomic import atomic_directory, file_sha256
from data_ingest.vocab import GeneVocab, write_text_atomic
from scgpt_dist.config import ExperimentConfig, saved_config
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train.storage import Store, local_copy, resolve

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


CheckpointLocation = Path | Store
"""Where a checkpoint is: a local `Path`, or a `Store` on an object store."""


def _shown(store: Store) -> CheckpointLocation:
    """What discovery returns for a checkpoint: a `Path` on local disk (as before), else the `Store`."""
    return Path(store.uri) if store.is_local else store


def validate_checkpoint(path: str | Path | Store, verify_checksums: bool = True) -> dict:
    """Return a complete checkpoint's meta, or raise `CheckpointError` naming what is wrong.

    `path` is a local directory, an object-store URI (`s3://bucket/run/checkpoints/step_00000012`) or a
    `Store`. Complete means: `meta.json` (rank 0), one manifest per rank of the world size recorded there,
    and every file a manifest lists present with its recorded size (and sha256, unless
    `verify_checksums=False`; on an object store the objects are streamed, not downloaded).
    """
    store = resolve(path)
    path = store.uri
    sizes = store.file_sizes()  # one listing; on an object store this replaces a HEAD per object
    if keys.META_FILE not in sizes:
        raise CheckpointError(f"{path} has no {keys.META_FILE}; it was not completely written")
    try:
        meta = json.loads(store.read_text(keys.META_FILE))
        world = int(meta["world_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}/{keys.META_FILE} is damaged ({err})") from err
    for rank in range(world):
        manifest_name = f"{MANIFEST_PREFIX}{rank}.json"
        if manifest_name not in sizes:
            raise CheckpointError(
                f"{path} lacks rank {rank}'s manifest; rank {rank}'s shard is missing or incomplete"
            )
        manifest = json.loads(store.read_text(manifest_name))
        for rel, info in manifest["files"].items():
            if rel not in sizes:
                raise CheckpointError(
                    f"{path} lacks {rel} (written by rank {rank}); a shard is missing"
                )
            if sizes[rel] != info["bytes"]:
                raise CheckpointError(f"{path}/{rel} has the wrong size; the file is truncated")
            if verify_checksums and store.sha256(rel) != info["sha256"]:
                raise CheckpointError(
                    f"{path}/{rel} fails its sha256 checksum; the file is corrupt"
                )
    for name in (keys.CONFIG_FILE, keys.VOCAB_FILE):
        if name not in sizes:
            raise CheckpointError(f"{path} lacks {name}")
    return meta


def find_latest_checkpoint(
    output_dir: str | Path | Store, verify_checksums: bool = True
) -> CheckpointLocation | None:
    """Newest complete `step_*` checkpoint under `output_dir/checkpoints`, skipping broken ones.

    `output_dir` is the run's checkpoint storage: a local directory or an object-store URI (or `Store`);
    the result is a `Path` on local disk, a `Store` on an object store.
    """
    root = resolve(output_dir) / CHECKPOINTS_DIR
    for name in reversed(root.list_dirs(STEP_PREFIX)):
        cand = root / name
        try:
            validate_checkpoint(cand, verify_checksums)
            return _shown(cand)
        except (CheckpointError, json.JSONDecodeError, KeyError, OSError) as err:
            log.warning("skipping checkpoint %s: %s", cand, err)
    return None


def prune_checkpoints(
    output_dir: str | Path | Store, keep: int, keep_best: bool = True
) -> list[CheckpointLocation]:
    """Delete all `step_*` directories but the newest `keep` and, with `keep_best`, the one with the lowest
    training loss recorded in its meta.json (complete or not otherwise); returns what was deleted.

    Works on a local directory or an object-store URI. Called by rank 0 right after a checkpoint is
    committed, so the newest one is always complete.
    """
    root = resolve(output_dir) / CHECKPOINTS_DIR
    steps = [root / name for name in root.list_dirs(STEP_PREFIX)]
    doomed = steps[: max(0, len(steps) - keep)] if keep > 0 else []
    if keep_best and doomed:
        best = min(steps, key=_recorded_loss)
        doomed = [s for s in doomed if s.path != best.path]
    for store in doomed:
        store.delete()
    return [_shown(s) for s in doomed]


def _recorded_loss(store: Store) -> float:
    try:
        loss = json.loads(store.read_text(keys.META_FILE)).get("loss")
        return float("inf") if loss is None else float(loss)
    except (OSError, ValueError):
        return float("inf")


def read_meta(checkpoint: str | Path | Store) -> dict:
    """A checkpoint's `meta.json` (local path, object-store URI or `Store`)."""
    return json.loads(resolve(checkpoint).read_text(keys.META_FILE))


def read_vocab(checkpoint: str | Path | Store) -> GeneVocab:
    """A checkpoint's `vocab.json`, read without downloading the shards."""
    return GeneVocab(json.loads(resolve(checkpoint).read_text(keys.VOCAB_FILE)))


@contextlib.contextmanager
def open_checkpoint(checkpoint: str | Path | Store, verify: bool = True) -> Iterator[Path]:
    """A local directory holding `checkpoint`, for DeepSpeed and consolidation (which read local files).

    On local disk that is the checkpoint itself. On an object store it is a download into a temporary
    directory, removed when the block exits (also when the download fails half-way). With `verify`, the
    checkpoint (for a download: the downloaded copy, so nothing is read twice) is validated first.
    """
    src = resolve(checkpoint)
    if src.is_local:
        if verify:
            validate_checkpoint(src)
        yield Path(src.path)
        return
    if verify:
        validate_checkpoint(src, verify_checksums=False)  # cheap: names the URI if incomplete
    with local_copy(src) as local:
        if verify:
            try:
                validate_checkpoint(local)
            except CheckpointError as err:
                raise CheckpointError(f"the download of {src} is not intact: {err}") from err
        yield local


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    return saved_config(yaml.safe_load(Path(path).read_text()))


def consolidate(
    checkpoint: str | Path | Store, out_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Gather any ZeRO stage's shards into one `model.safetensors` directory (local), atomically. A
    checkpoint on an object store is downloaded to a temporary directory first."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    with open_checkpoint(checkpoint) as local:
        state = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=DS_TAG)
        state = {k: v.to(dtype).contiguous() for k, v in state.items()}
        with atomic_directory(out_dir) as tmp:
            save_file(state, str(tmp / keys.MODEL_FILE), metadata={"format": "pt"})
            for name in (keys.CONFIG_FILE, keys.VOCAB_FILE, keys.META_FILE):
                shutil.copy2(local / name, tmp / name)
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

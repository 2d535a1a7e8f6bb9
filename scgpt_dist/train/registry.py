"""The MLflow model registry as `jobs.repretrain` uses it, and the data versions recorded there.

- **Data versions.** A model version carries the version of the data it was trained on (tag `data_version`):
  for a local SOMA experiment, its ingest log (`ingest-<entries>-<hash>`, data_ingest.ingest); for the
  CELLxGENE Census, the pinned release (`2025-01-30`). `local_data_version` / `newest_census_version` say
  what the data is now; `DataVersion.new_datasets_since` what was added after a model's version.
- **Promotion** is a registry alias (`champion` by default) moved with compare-and-set semantics: `promote`
  refuses when the alias no longer points where the run started from, so two runs never both promote, and
  promoting the same version twice is a no-op. `rollback` moves the alias back to the version recorded as
  `previous_version` and puts re-pretraining on hold until `release`.
- **Registration is idempotent**: a training run's model is registered once (found again by run id), in one
  `create_model_version` call that carries every tag, so there is never a version without its data tags.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from data_ingest import keys
from data_ingest.atomic import atomic_directory
from data_ingest.ingest import read_log

log = logging.getLogger(__name__)

# Model-version tags (registry keys).
TAG_DATA_VERSION = "data_version"
TAG_DATA_VERSIONS = "data_versions"
"""How the data version is defined: `ingest_log` or `census`."""
TAG_INGEST_ENTRIES = "ingest_log_entries"
TAG_CENSUS_VERSION = "census_version"
TAG_SOMA_URI = "soma_uri"
TAG_VOCAB_SIZE = "vocab_size"
TAG_VOCAB_FINGERPRINT = "vocab_fingerprint"
TAG_WARM_STARTED_FROM = "warm_started_from"
TAG_GATE = "gate"
TAG_RUN_DIR = "repretrain_run_dir"
TAG_PREVIOUS_VERSION = "previous_version"
TAG_PROMOTED_AT = "promoted_at"
TAG_ROLLED_BACK_AT = "rolled_back_at"
# Registered-model tag: while set, jobs.repretrain does nothing (set by `rollback`, cleared by `release`).
TAG_HOLD = "repretrain_hold"

INGEST_LOG = "ingest_log"
CENSUS = "census"
CENSUS_ALIASES = ("stable", "latest")


class PromotionConflict(RuntimeError):
    """The alias moved while a re-pretraining run was in progress; nothing was promoted."""


# ------------------------------------------------------------------------------------------ data versions


@dataclass
class DataVersion:
    """What the data is now, in the form recorded on model versions."""

    kind: str
    """`ingest_log` or `census`."""
    version: str
    """`ingest-<entries>-<hash>` or a census release date."""
    datasets: list[str] = field(default_factory=list)
    """ingest_log: dataset ids in log order (the base experiment is entry 0 of nothing)."""
    census_version: str | None = None

    def tags(self) -> dict[str, str]:
        tags = {TAG_DATA_VERSION: self.version, TAG_DATA_VERSIONS: self.kind}
        if self.kind == INGEST_LOG:
            tags[TAG_INGEST_ENTRIES] = str(len(self.datasets))
        if self.census_version:
            tags[TAG_CENSUS_VERSION] = self.census_version
        return tags


def _log_digest(entries: list[dict]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(e["sha256"].encode())
    return h.hexdigest()[:12]


def local_data_version(experiment_uri: str | Path) -> DataVersion:
    """The data version of a local SOMA experiment: how many datasets its ingest log lists, and a hash
    of their file digests (so a rewritten log is noticed)."""
    entries = read_log(experiment_uri)
    return DataVersion(
        kind=INGEST_LOG,
        version=f"ingest-{len(entries)}-{_log_digest(entries)}",
        datasets=[e["dataset_id"] for e in entries],
    )


def new_ingested_datasets(experiment_uri: str | Path, promoted_tags: dict[str, str]) -> list[str]:
    """Datasets ingested after the promoted model's data version (entries past the ones it saw)."""
    entries = read_log(experiment_uri)
    try:
        seen = int(promoted_tags[TAG_INGEST_ENTRIES])
    except (KeyError, ValueError):
        raise ValueError(
            f"the promoted model has no {TAG_INGEST_ENTRIES!r} tag, so the datasets it was trained on are "
            "unknown; promote a version registered by jobs.repretrain (or set that tag on it)"
        ) from None
    recorded = promoted_tags.get(TAG_DATA_VERSION, "")
    if seen > len(entries) or recorded != f"ingest-{seen}-{_log_digest(entries[:seen])}":
        raise ValueError(
            f"the ingest log of {experiment_uri} does not extend the promoted model's data version "
            f"{recorded!r} (the log was rewritten or belongs to another experiment); re-pretrain from "
            "scratch into a new registered model name"
        )
    return [e["dataset_id"] for e in entries[seen:]]


def census_directory(lts_only: bool = True) -> dict[str, dict]:
    """The CELLxGENE Census release directory (network), LTS releases only by default."""
    import cellxgene_census

    try:
        return cellxgene_census.get_census_version_directory(lts=True if lts_only else None)
    except Exception as err:  # offline: requests' ConnectionError and friends
        raise ValueError(
            f"the CELLxGENE Census release directory is unreachable ({type(err).__name__}: {err}); "
            "re-pretraining on the census needs network access to it"
        ) from err


def newest_census_version(directory: dict[str, dict], lts_only: bool = True) -> str:
    """The newest release in a `get_census_version_directory()` answer, by its dated name (aliases such as
    `stable`, `latest` and `V2` skipped; retracted releases and, with `lts_only`, weekly builds ignored)."""
    dated = []
    for name, desc in directory.items():
        if name in CENSUS_ALIASES or not _is_date(name):
            continue
        flags = (desc or {}).get("flags", {})
        if flags.get("retracted"):
            continue
        if lts_only and not flags.get("lts"):
            continue
        dated.append(name)
    if not dated:
        kind = "LTS " if lts_only else ""
        raise ValueError(
            f"the census directory lists no {kind}release; set repretrain.census_lts_only=false for weekly builds"
        )
    return max(dated)


def _is_date(name: str) -> bool:
    try:
        dt.date.fromisoformat(name)
        return True
    except ValueError:
        return False


def census_datasets(version: str) -> set[str]:
    """Dataset ids of a census release (`census_info/datasets`)."""
    import cellxgene_census

    with cellxgene_census.open_soma(census_version=version) as census:
        table = census[keys.CENSUS_INFO][keys.CENSUS_DATASETS].read(column_names=["dataset_id"])
        return set(table.concat()["dataset_id"].to_pylist())


def census_data_version(version: str) -> DataVersion:
    return DataVersion(kind=CENSUS, version=version, census_version=version)


# --------------------------------------------------------------------------------------------- registry


def promoted_version(client, name: str, alias: str):
    """The model version `alias` points to, or None (no such registered model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def hold_reason(client, name: str) -> str | None:
    """Why re-pretraining is on hold for `name` (set by `rollback`), or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name).tags.get(TAG_HOLD)
    except MlflowException:
        return None


def version_for_run(client, name: str, run_id: str):
    """The version of `name` registered from training run `run_id`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def register_candidate(client, name: str, run_id: str, tags: dict[str, str]):
    """Register run `run_id`'s consolidated model (artifact `model/`) as a version of `name`, with all
    its tags in the same call; a second call for the same run returns the existing version."""
    from mlflow.exceptions import MlflowException

    existing = version_for_run(client, name, run_id)
    if existing is not None:
        log.info("run %s is already registered as %s version %s", run_id, name, existing.version)
        return existing
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already exists
    run = client.get_run(run_id)
    return client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run_id,
        tags={k: str(v) for k, v in tags.items()},
    )


def promote(client, name: str, alias: str, version: str, expected: str | None) -> bool:
    """Point `alias` at `version` if it still points at `expected` (None: no alias yet). Returns False when
    it already points at `version` (nothing to do); raises `PromotionConflict` when it moved elsewhere."""
    current = promoted_version(client, name, alias)
    current_v = None if current is None else str(current.version)
    if current_v == str(version):
        return False
    if current_v != (None if expected is None else str(expected)):
        raise PromotionConflict(
            f"{name}@{alias} is version {current_v}, not version {expected} this run started from "
            "(another run or an operator moved it); nothing promoted. Run again to re-pretrain from "
            "the current version"
        )
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if current_v is not None:
        client.set_model_version_tag(name, str(version), TAG_PREVIOUS_VERSION, current_v)
    client.set_model_version_tag(name, str(version), TAG_PROMOTED_AT, now)
    client.set_registered_model_alias(name, alias, str(version))  # the one step that promotes
    return True


def rollback(client, name: str, alias: str, reason: str) -> tuple[str, str]:
    """Move `alias` back to the version it pointed to before the current one, and put re-pretraining on
    hold (`release` lifts it). Returns (from version, to version)."""
    current = promoted_version(client, name, alias)
    if current is None:
        raise ValueError(f"{name} has no {alias!r} alias; there is nothing to roll back")
    previous = current.tags.get(TAG_PREVIOUS_VERSION)
    if not previous:
        raise ValueError(
            f"{name}@{alias} (version {current.version}) records no previous version; point the alias "
            f"by hand: MlflowClient().set_registered_model_alias({name!r}, {alias!r}, <version>)"
        )
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(name, str(current.version), TAG_ROLLED_BACK_AT, now)
    client.set_registered_model_alias(name, alias, previous)
    client.set_registered_model_tag(
        name, TAG_HOLD, json.dumps({"reason": reason, "rolled_back": current.version, "at": now})
    )
    return str(current.version), previous


def release(client, name: str) -> None:
    """Lift a hold set by `rollback`: the next scheduled run re-pretrains from the current version."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model_tag(name, TAG_HOLD)
    except MlflowException:
        pass


def download_model(version, dst: str | Path, tracking_uri: str) -> Path:
    """Copy a model version's consolidated model directory to `dst` (atomically; kept if present)."""
    import shutil

    import mlflow.artifacts

    dst = Path(dst)
    if (dst / keys.MODEL_FILE).is_file():
        return dst
    with atomic_directory(dst) as tmp:
        got = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=version.source, dst_path=str(tmp / "dl"), tracking_uri=tracking_uri
            )
        )
        for item in got.iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(tmp / "dl", ignore_errors=True)
    return dst

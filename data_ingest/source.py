"""Which cells to read from a SOMA experiment, and the lookups needed to tokenize them.

`SomaCellSource.resolve()` runs once on the driver: it opens the experiment, applies the obs filter and the
train / holdout split, and returns a `ResolvedSource` — plain arrays that are cheap to ship to Ray read tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_ingest import keys
from data_ingest.vocab import GeneVocab


@dataclass
class SourceConfig:
    """Where cells come from and which ones are used."""

    soma_uri: str = "outputs/demo/soma"
    """Path or URI of a SOMA experiment with the census layout."""
    measurement: str = keys.MEASUREMENT_RNA
    """Measurement holding the expression matrix."""
    layer: str = keys.RAW_LAYER
    """X layer to read (the census stores counts in `raw`)."""
    value_filter: str | None = None
    """SOMA obs filter, e.g. `is_primary_data == True`; None reads every cell."""
    batch_key: str = keys.OBS_DATASET
    """obs column whose categories become batch ids."""
    label_key: str | None = keys.OBS_CELL_TYPE
    """obs column whose categories become labels (for evaluation and CLS); None for none."""
    holdout_fraction: float = 0.1
    """Fraction of cells held out of training, chosen by a hash of soma_joinid."""
    split_seed: int = 0
    """Seed of the train / holdout hash."""
    census_version: str | None = None
    """CELLxGENE Census release to open with `cellxgene_census.open_soma`, pinned (e.g. `2025-01-30`;
    `stable` / `latest` are refused so a run never changes data silently). None reads `soma_uri`, which may
    be an experiment or a collection with the census layout (`census_data/<organism>`)."""
    organism: str = keys.DEFAULT_ORGANISM
    """Experiment under `census_data/` when the source has the census layout."""
    primary_only: bool = True
    """With the census layout, keep only `is_primary_data == True` cells (the census repeats cells across
    datasets)."""
    tissues: list[str] | None = None
    """Keep only these `tissue_general` values (None keeps all)."""
    assays: list[str] | None = None
    """Keep only these `assay` values (None keeps all)."""


TRAIN = "train"
HOLDOUT = "holdout"
ALL = "all"


@dataclass
class ResolvedSource:
    """Everything a read task needs: which cells, and how to map columns to ids."""

    soma_uri: str
    measurement: str
    layer: str
    joinids: np.ndarray
    feature_tokens: np.ndarray
    """Vocabulary id of each var soma_joinid, -1 if unknown to the vocabulary."""
    batch_key: str
    batch_categories: list[str]
    label_key: str | None
    label_categories: list[str] = field(default_factory=list)
    tiledb_config: dict[str, str] | None = None
    """TileDB settings to open `soma_uri` with (e.g. S3 region for the public census)."""
    batch_log_profile: np.ndarray | None = None
    """`(len(batch_categories), n_vars)` log mean expression per batch (`views.batch_log_profile`), for
    restyled views (`tokenizer.view_restyle`); `datasource.attach_batch_profile` sets it."""
    batch_log_depths: np.ndarray | None = None
    """`(len(batch_categories), views.DEPTH_QUANTILES)` quantiles of each batch's log library size
    (`views.batch_log_depths`), for `tokenizer.view_restyle_depth: cell`; set with the profile."""


def holdout_mask(joinids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for held-out cells: a stable hash of (soma_joinid, seed), independent of read order."""
    x = joinids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(1_000_000)) < np.uint64(round(fraction * 1_000_000))


CENSUS_ALIASES = ("stable", "latest")


def _census_versions() -> list[str] | None:
    """Available census releases, or None when the release directory is unreachable."""
    import cellxgene_census

    try:
        directory = cellxgene_census.get_census_version_directory()
    except Exception:  # offline: requests raises ConnectionError and friends
        return None
    return sorted(v for v in directory if v not in CENSUS_ALIASES)


def census_locator(version: str, organism: str) -> tuple[str, dict[str, str]]:
    """(experiment URI, TileDB config) of a pinned public census release; clear errors otherwise."""
    import cellxgene_census

    if version in CENSUS_ALIASES:
        raise ValueError(
            f"census_version={version!r} is an alias that moves with new releases; pin a release "
            "(e.g. data.source.census_version=2025-01-30) so the run's data never changes silently"
        )
    available = _census_versions()
    if available is None:
        raise ValueError(
            f"the CELLxGENE Census release directory is unreachable, so census_version={version!r} "
            "cannot be opened; on an offline machine pass a local copy with the census layout as "
            "data.source.soma_uri (or --soma-uri) and leave census_version unset"
        )
    if version not in available:
        raise ValueError(
            f"census_version={version!r} does not exist; available releases: {', '.join(available)}"
        )
    soma = cellxgene_census.get_census_version_description(version)["soma"]
    config = {"vfs.s3.no_sign_request": "true"}
    if soma.get("s3_region"):
        config["vfs.s3.region"] = soma["s3_region"]
    return f"{soma['uri'].rstrip('/')}/{keys.CENSUS_DATA}/{organism}", config


def locate_experiment(cfg: SourceConfig) -> tuple[str, dict[str, str] | None, bool]:
    """(experiment URI, TileDB config, has census layout) for a source config."""
    import tiledbsoma

    if cfg.census_version is not None:
        uri, config = census_locator(cfg.census_version, cfg.organism)
        return uri, config, True
    uri = str(cfg.soma_uri)
    try:
        with tiledbsoma.open(uri) as obj:
            kind = type(obj)
    except Exception:
        return uri, None, False  # open_experiment reports what is wrong
    if issubclass(kind, tiledbsoma.Experiment):
        return uri, None, False
    with tiledbsoma.Collection.open(uri) as coll:
        if keys.CENSUS_DATA not in coll:
            raise ValueError(
                f"{uri} is a SOMA collection without {keys.CENSUS_DATA!r}; pass an experiment or a "
                "collection with the CELLxGENE Census layout"
            )
        organisms = list(coll[keys.CENSUS_DATA].keys())
    if cfg.organism not in organisms:
        raise ValueError(
            f"census at {uri} has no organism {cfg.organism!r}; set data.source.organism to one of "
            f"{organisms}"
        )
    return f"{uri.rstrip('/')}/{keys.CENSUS_DATA}/{cfg.organism}", None, True


def _quote_list(values: list[str]) -> str:
    return "[" + ", ".join(repr(str(v)) for v in values) + "]"


def effective_filter(cfg: SourceConfig, is_census: bool) -> str | None:
    """The obs value_filter actually applied: the user's filter AND census defaults AND selections."""
    parts = []
    if cfg.value_filter:
        parts.append(f"({cfg.value_filter})")
    if is_census and cfg.primary_only:
        parts.append(keys.PRIMARY_FILTER)
    if cfg.tissues:
        parts.append(f"{keys.OBS_TISSUE_GENERAL} in {_quote_list(cfg.tissues)}")
    if cfg.assays:
        parts.append(f"{keys.OBS_ASSAY} in {_quote_list(cfg.assays)}")
    return " and ".join(parts) or None


def open_experiment(uri: str, tiledb_config: dict[str, str] | None = None):
    """Open a SOMA experiment, with an error that names the problem when it is not one."""
    import tiledbsoma

    try:
        if tiledb_config:
            ctx = tiledbsoma.SOMATileDBContext(tiledb_config=tiledb_config)
            return tiledbsoma.Experiment.open(str(uri), context=ctx)
        return tiledbsoma.Experiment.open(str(uri))
    except Exception as err:
        raise ValueError(
            f"cannot open a SOMA experiment at {uri!r} ({type(err).__name__}: {err}); "
            "build one with `python -m jobs.pretrain` on the demo config or pass data.source.soma_uri"
        ) from err


class SomaCellSource:
    """Cells of one SOMA experiment, filtered and split."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self._located: tuple[str, dict[str, str] | None, bool] | None = None

    @property
    def located(self) -> tuple[str, dict[str, str] | None, bool]:
        """(experiment URI, TileDB config, census layout), looked up once."""
        if self._located is None:
            self._located = locate_experiment(self.cfg)
        return self._located

    @property
    def value_filter(self) -> str | None:
        """The obs filter applied (see `effective_filter`)."""
        return effective_filter(self.cfg, self.located[2])

    def gene_names(self) -> list[str]:
        """Gene names of the measurement, in var soma_joinid order."""
        with open_experiment(*self.located[:2]) as exp:
            var = self._var(exp)
        return var[keys.VAR_GENE_NAME].astype(str).tolist()

    def _var(self, exp) -> pd.DataFrame:
        if self.cfg.measurement not in exp.ms:
            raise ValueError(
                f"experiment {self.cfg.soma_uri} has no measurement {self.cfg.measurement!r}; "
                f"it has {list(exp.ms.keys())}"
            )
        ms = exp.ms[self.cfg.measurement]
        if self.cfg.layer not in ms.X:
            raise ValueError(
                f"measurement {self.cfg.measurement!r} has no X layer {self.cfg.layer!r}; "
                f"set data.source.layer to one of {list(ms.X.keys())}"
            )
        var = ms.var.read(column_names=[keys.SOMA_JOINID, keys.VAR_GENE_NAME]).concat().to_pandas()
        return var.sort_values(keys.SOMA_JOINID).reset_index(drop=True)

    def resolve(self, vocab: GeneVocab, split: str = TRAIN) -> ResolvedSource:
        cfg = self.cfg
        uri, tiledb_config, _ = self.located
        value_filter = self.value_filter
        with open_experiment(uri, tiledb_config) as exp:
            var = self._var(exp)
            obs_cols = [keys.SOMA_JOINID, cfg.batch_key] + (
                [cfg.label_key] if cfg.label_key else []
            )
            missing = [c for c in obs_cols if c not in exp.obs.schema.names]
            if missing:
                raise ValueError(
                    f"obs of {cfg.soma_uri} has no column(s) {missing}; "
                    f"available: {exp.obs.schema.names}"
                )
            obs = (
                exp.obs.read(column_names=obs_cols, value_filter=value_filter).concat().to_pandas()
            )
        if len(obs) == 0:
            raise ValueError(
                f"the obs filter {value_filter!r} selects no cells in {uri}; loosen it"
            )
        feature_tokens = np.full(int(var[keys.SOMA_JOINID].max()) + 1, -1, dtype=np.int64)
        feature_tokens[var[keys.SOMA_JOINID].to_numpy()] = vocab.lookup(
            var[keys.VAR_GENE_NAME].tolist()
        )
        if (feature_tokens >= 0).sum() == 0:
            raise ValueError(
                f"none of the {len(var)} genes of {cfg.soma_uri} are in the vocabulary; "
                "build the vocabulary from this experiment or pass the matching vocab.json"
            )
        joinids = np.sort(obs[keys.SOMA_JOINID].to_numpy().astype(np.int64))
        if split != ALL:
            held = holdout_mask(joinids, cfg.holdout_fraction, cfg.split_seed)
            joinids = joinids[held] if split == HOLDOUT else joinids[~held]
        if len(joinids) == 0:
            raise ValueError(
                f"split {split!r} of {cfg.soma_uri} has no cells; change holdout_fraction"
            )
        batch_cats = sorted(obs[cfg.batch_key].astype(str).unique().tolist())
        label_cats = (
            sorted(obs[cfg.label_key].astype(str).unique().tolist()) if cfg.label_key else []
        )
        return ResolvedSource(
            soma_uri=uri,
            measurement=cfg.measurement,
            layer=cfg.layer,
            joinids=joinids,
            feature_tokens=feature_tokens,
            batch_key=cfg.batch_key,
            batch_categories=batch_cats,
            label_key=cfg.label_key,
            label_categories=label_cats,
            tiledb_config=tiledb_config,
        )

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


def holdout_mask(joinids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for held-out cells: a stable hash of (soma_joinid, seed), independent of read order."""
    x = joinids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(1_000_000)) < np.uint64(round(fraction * 1_000_000))


def open_experiment(uri: str):
    """Open a SOMA experiment, with an error that names the problem when it is not one."""
    import tiledbsoma

    try:
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

    def gene_names(self) -> list[str]:
        """Gene names of the measurement, in var soma_joinid order."""
        with open_experiment(self.cfg.soma_uri) as exp:
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
        with open_experiment(cfg.soma_uri) as exp:
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
                exp.obs.read(column_names=obs_cols, value_filter=cfg.value_filter)
                .concat()
                .to_pandas()
            )
        if len(obs) == 0:
            raise ValueError(
                f"the obs filter {cfg.value_filter!r} selects no cells in {cfg.soma_uri}; loosen it"
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
            soma_uri=str(cfg.soma_uri),
            measurement=cfg.measurement,
            layer=cfg.layer,
            joinids=joinids,
            feature_tokens=feature_tokens,
            batch_key=cfg.batch_key,
            batch_categories=batch_cats,
            label_key=cfg.label_key,
            label_categories=label_cats,
        )

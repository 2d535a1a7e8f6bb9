"""The re-pretraining job's settings: the experiment config plus a `repretrain` section (what counts as new
data, where the promoted model is, the warm start and the gate). Only this job reads them; the candidate it
pretrains gets a plain `ExperimentConfig`.

    repretrain:
      data_versions: ingest_log     # or census
      alias: champion
      gate: {max_old_loss_ratio: 1.05, eval_cells: 2000}
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from scgpt_dist.config import ExperimentConfig, load_config


@dataclass
class GateConfig:
    """When a re-pretrained candidate may replace the promoted model (`jobs.repretrain`). Both models are
    evaluated on the same fixed held-out cells (tokenized with the promoted model's vocabulary)."""

    max_old_loss_ratio: float = 1.05
    """Candidate held-out GEP MSE on old data <= promoted model's x this (bounded forgetting)."""
    max_new_loss_ratio: float = 1.0
    """Candidate held-out GEP MSE on new data <= promoted model's x this."""
    max_knn_drop: float = 0.05
    """Candidate zero-shot kNN cell-type accuracy >= promoted model's - this."""
    eval_cells: int = 2000
    """Held-out cells evaluated per part (old, new): the first ones by soma_joinid, so the set is fixed."""
    mask_ratio: float = 0.4
    """GEP mask ratio of the evaluation."""
    knn_k: int = 10
    """Neighbours of the kNN classifier."""
    seed: int = 0
    """Seed of the evaluation masks and folds."""


DATA_VERSION_SOURCES = ("ingest_log", "census")


@dataclass
class RepretrainConfig:
    """Scheduled re-pretraining (`python -m jobs.repretrain`): what counts as new data, where the promoted
    model is, how the warm start and the gate work."""

    data_versions: str = "ingest_log"
    """`ingest_log`: versions of a local experiment are its ingest log (data_ingest.ingest); `census`: the
    CELLxGENE Census release directory (the newest release is pinned into data.source.census_version)."""
    census_lts_only: bool = True
    """With `census`: follow long-term-stable releases only (weekly builds otherwise)."""
    alias: str = "champion"
    """Registry alias of the promoted version of `mlflow.registered_model`."""
    new_gene_noise: float = 0.1
    """New gene embedding rows = mean of the existing gene rows + Gaussian noise of this many times their
    standard deviation."""
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if self.data_versions not in DATA_VERSION_SOURCES:
            raise ValueError(
                f"repretrain.data_versions={self.data_versions!r}; choose one of {DATA_VERSION_SOURCES}"
            )


@dataclass
class RepretrainExperiment(ExperimentConfig):
    """An experiment config with the job's `repretrain` section (`jobs/configs/repretrain*.yaml`)."""

    repretrain: RepretrainConfig = field(default_factory=RepretrainConfig)

    def experiment(self) -> ExperimentConfig:
        """A deep copy without the job's section: what pretraining, checkpoints and workers read."""
        return ExperimentConfig(
            **{
                f.name: copy.deepcopy(getattr(self, f.name))
                for f in dataclasses.fields(ExperimentConfig)
            }
        )


def load_repretrain_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> RepretrainExperiment:
    """The job's config from YAML (or defaults) plus `key.sub=value` overrides."""
    return load_config(path, overrides, cls=RepretrainExperiment)

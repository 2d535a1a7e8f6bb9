"""The scale ablation's configuration: the grid of model sizes and cell counts, steps, the context arm,
evaluation, the fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scgpt_dist.config import (
    ConfigError,
    ExperimentConfig,
    MlflowConfig,
    apply_overrides,
    from_dict,
)
from scgpt_dist.model.config import ModelConfig

log = logging.getLogger(__name__)

WHOLE = "whole"
ABLATION_EXPERIMENT = "scgpt-dist-scale-ablation"
FIT_METRIC = "heldout_gep_mse"
MODEL_KEYS = ("d_model", "n_layers", "n_heads", "d_hid")
CELL_METRICS = (
    "n_params", "n_train_cells", "steps", "tokens_seen", "compute_flops", "final_train_loss", FIT_METRIC,
    "heldout_gep_mse_baseline", "knn_acc", "heldout_gep_mse_tissue", "knn_acc_tissue",
)  # fmt: skip
"""What each cell reports, in the sweep's comparison table's order."""


@dataclass
class ModelSize:
    """One model size of the grid (overrides of `base.model`)."""

    name: str = "s"
    size: str | None = None
    """A named size (`scgpt_dist.model.sizes`) for the four fields below, where they are not set."""
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    d_hid: int = 64

    expand_preset = staticmethod(ModelConfig.expand_preset)


@dataclass
class StepsConfig:
    """How long each cell trains."""

    epochs: float | None = 1.0
    """Passes over the cell's D training cells: steps = ceil(epochs x D / global batch), so every cell
    sees its data the same number of times (compute grows with D). None: use `fixed`."""
    fixed: int | None = None
    """Same optimizer steps for every cell (data repeats more for small D); used when epochs is None."""
    min_steps: int = 10
    """Lower bound on steps (warmup must fit)."""
    warmup_fraction: float = 0.1
    """Warmup steps as a fraction of the cell's steps (at least 1)."""

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.fixed is None):
            raise ValueError("steps: set exactly one of steps.epochs and steps.fixed")


@dataclass
class ContextArm:
    """Organ-restricted pretraining next to whole-census pretraining at the same N and D."""

    tissue: str | None = None
    """`tissue_general` value of the organ arm; None: no context arm."""
    n_cells: list[int] = field(default_factory=list)
    """D values of the organ arm (each also runs on the whole census if the grid lacks it)."""
    models: list[str] = field(default_factory=list)
    """Model size names of the organ arm."""


@dataclass
class EvalConfig:
    holdout_fraction: float = 0.1
    """Cells never trained on by any cell (by a hash of soma_joinid); evaluation draws from them."""
    max_cells: int = 1000
    """Evaluation cells (a fixed seeded subset of the held-out ones)."""
    knn_k: int = 10
    """Neighbours of the kNN cell-type classifier."""
    baseline_cells: int = 3000
    """Training cells whose per-gene means form the GEP baseline."""
    seed: int = 0


@dataclass
class FinetuneStep:
    """Optional `jobs.finetune` task run on each cell's model (its metrics join the cell's, prefixed)."""

    task: str | None = None
    args: list[str] = field(default_factory=list)
    """e.g. [--data, pbmc68k_reduced, --epochs, '2']; --checkpoint, --out and MLflow flags are set per cell."""


@dataclass
class FitConfig:
    bootstrap: int = 200
    """Bootstrap refits for the confidence intervals."""
    level: float = 0.95
    seed: int = 0


@dataclass
class ScaleAblationConfig:
    """A grid of model sizes x pretraining cell counts, a context arm, evaluation, the fit."""

    name: str = "scale-ablation"
    output_dir: str = "outputs/scale_ablation"
    base: dict[str, Any] = field(default_factory=dict)
    """The experiment config every cell starts from (an `ExperimentConfig` mapping, as in a pretrain YAML);
    the cell sets model size, training cells, steps, output_dir and MLflow."""
    models: list[ModelSize] = field(default_factory=list)
    n_cells: list[int] = field(default_factory=list)
    """D: pretraining cell counts (each <= the source's cells x (1 - eval.holdout_fraction))."""
    steps: StepsConfig = field(default_factory=StepsConfig)
    context: ContextArm = field(default_factory=ContextArm)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneStep = field(default_factory=FinetuneStep)
    fit: FitConfig = field(default_factory=FitConfig)
    concurrency: int = 1
    """Cells pretraining at once (1 on a small machine: each cell already runs num_workers ranks)."""
    num_cpus: float = 0.0
    """CPUs each cell's Ray task reserves (0: its TorchTrainer reserves what it needs)."""
    num_gpus: float = 0.0
    mlflow: MlflowConfig = field(
        default_factory=lambda: MlflowConfig(experiment=ABLATION_EXPERIMENT)
    )
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    """Logical CPUs of a local Ray instance; None = cores + train workers + 1 (read tasks need room)."""

    def __post_init__(self) -> None:

        from_dict(ExperimentConfig, self.base, "base")  # validates the base (unknown keys etc.)
        self.models = [  # from_dict leaves list items as mappings
            m if isinstance(m, ModelSize) else from_dict(ModelSize, m, f"models[{i}]")
            for i, m in enumerate(self.models)
        ]
        if self.mlflow.registered_model:
            raise ValueError(
                "mlflow.registered_model: the ablation registers no model; leave it unset"
            )
        if not self.models or not self.n_cells:
            raise ValueError("give at least one entry in `models` and in `n_cells`")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        unknown = set(self.context.models) - set(names)
        if unknown:
            raise ValueError(
                f"context.models names {sorted(unknown)} not in models ({names}); fix the name"
            )
        if self.context.tissue and not (self.context.n_cells and self.context.models):
            raise ValueError("context.tissue needs context.n_cells and context.models")
        if any(d < 1 for d in self.n_cells + self.context.n_cells):
            raise ValueError(f"n_cells must be positive, got {self.n_cells}")

    def model(self, name: str) -> ModelSize:
        return next(m for m in self.models if m.name == name)


def load_ablation_config(path: str | Path, overrides: list[str] | None = None):
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"no scale-ablation config at {path}; see jobs/configs/scale_ablation_*.yaml"
        )
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(ScaleAblationConfig, apply_overrides(data, list(overrides or [])))

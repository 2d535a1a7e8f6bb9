"""Scale ablation: pretrain a grid of model sizes (N) x pretraining cell counts (D), plus an organ-restricted
context arm, evaluate every model downstream, and fit L(N, D) = E + A/N^alpha + B/D^beta.

    python -m jobs.scale_ablation --config jobs/configs/scale_ablation_cpu.yaml [key.sub=value ...]
    python -m jobs.scale_ablation --config ... --report-only      # refit / replot finished cells

Every grid cell is one cell of a `jobs.sweep` (a Ray task; resumable, keyed by a hash of its parameters; its
pretraining run is an MLflow child of the ablation's parent run). A cell:

1. pretrains with `run_pretraining` (Ray Train + DeepSpeed) on D cells of the source: the cells whose
   split hash puts them outside a held-out fraction chosen so that ~D cells remain. Held-out sets nest, so
   every cell's training set excludes the same evaluation cells (`eval.holdout_fraction`), and a smaller D is
   a subset of a larger one;
2. evaluates the consolidated model on those evaluation cells: held-out GEP MSE (masked-value regression, next
   to the per-gene-mean baseline), kNN cell-type accuracy of its zero-shot `<cls>` embeddings, and the same two
   on the context tissue's evaluation cells; optionally a `jobs.finetune` task on the model;
3. logs N (non-embedding parameters), D (training cells), tokens seen and compute (6 N tokens) with the
   metrics to its MLflow run.

The driver then reads every cell's metrics back from MLflow (child runs of the parent), fits the scaling law
on the whole-census cells with bootstrap CIs (`jobs.scaling_law`), and writes a report: the table, the fit,
loss vs compute, downstream accuracy vs D, and the context arm next to the whole-census model of the same N
and D.

Nesting: a cell is a Ray task that itself runs a TorchTrainer, whose workers and read tasks reserve their own
CPUs. The cell's task reserves `num_cpus` (default 0) so it never holds a CPU the trainer it starts needs;
on a 2-core machine run one cell at a time (`concurrency: 1`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs._cli import quiet_ray_data, run_main, setup_logging
from scgpt_dist.config import MlflowConfig
from scgpt_dist.model.config import ModelConfig
from scgpt_dist.train.tracking import PARENT_RUN_TAG

log = logging.getLogger(__name__)

WHOLE = "whole"
ABLATION_EXPERIMENT = "scgpt-dist-scale-ablation"
FIT_METRIC = "heldout_gep_mse"
MODEL_KEYS = ("d_model", "n_layers", "n_heads", "d_hid")


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
        from scgpt_dist.config import ExperimentConfig, from_dict

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

    from scgpt_dist.config import ConfigError, apply_overrides, from_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"no scale-ablation config at {path}; see jobs/configs/scale_ablation_*.yaml"
        )
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(ScaleAblationConfig, apply_overrides(data, list(overrides or [])))


# ------------------------------------------------------------------------------------------------ grid


def grid_cells(cfg: ScaleAblationConfig) -> list[dict[str, Any]]:
    """Cell parameters: every (model, D) on the whole census, then the context arm (organ-restricted, and the
    whole-census twin of each organ cell)."""
    cells = [
        {"model": asdict(m), "n_cells": d, "tissue": WHOLE} for m in cfg.models for d in cfg.n_cells
    ]
    if cfg.context.tissue:
        for name in cfg.context.models:
            for d in cfg.context.n_cells:
                for tissue in (cfg.context.tissue, WHOLE):
                    cell = {"model": asdict(cfg.model(name)), "n_cells": d, "tissue": tissue}
                    if cell not in cells:
                        cells.append(cell)
    return cells


def sweep_config(cfg: ScaleAblationConfig):
    """The ablation as a `jobs.sweep` config: a callable job whose kwargs are what every cell shares."""
    from jobs.sweep import JobSpec, SweepConfig

    return SweepConfig(
        name=cfg.name,
        output_dir=cfg.output_dir,
        job=JobSpec(
            kind="callable",
            function="jobs.scale_ablation:run_ablation_cell",
            kwargs={
                "base": cfg.base,
                "steps": asdict(cfg.steps),
                "eval": asdict(cfg.eval),
                "finetune": asdict(cfg.finetune),
                "context_tissue": cfg.context.tissue,
            },
        ),
        cells=grid_cells(cfg),
        concurrency=cfg.concurrency,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        metrics=[
            "n_params",
            "n_train_cells",
            "steps",
            "tokens_seen",
            "compute_flops",
            "final_train_loss",
            FIT_METRIC,
            "heldout_gep_mse_baseline",
            "knn_acc",
            "heldout_gep_mse_tissue",
            "knn_acc_tissue",
        ],
        mlflow=MlflowConfig(tracking_uri=cfg.mlflow.tracking_uri, experiment=cfg.mlflow.experiment),
        ray_address=cfg.ray_address,
    )


# ------------------------------------------------------------------------------------------------ one cell


def _source_cfg(base_source, tissue: str | None, holdout_fraction: float):
    from dataclasses import replace

    return replace(
        base_source,
        tissues=[tissue] if tissue and tissue != WHOLE else base_source.tissues,
        holdout_fraction=holdout_fraction,
    )


def train_holdout_fraction(pool: int, n_cells: int, eval_fraction: float, where: str) -> float:
    """Held-out fraction leaving ~n_cells of `pool` for training (>= the evaluation fraction, so the
    evaluation cells are held out of every cell's training set)."""
    usable = int(pool * (1 - eval_fraction))
    if n_cells > usable:
        raise ValueError(
            f"n_cells={n_cells} exceeds the {usable} cells {where} has outside the evaluation hold-out "
            f"({pool} cells x (1 - {eval_fraction})); lower n_cells or use a bigger source"
        )
    return 1.0 - n_cells / pool


def count_cells(source_cfg) -> int:
    from data_ingest.source import SomaCellSource, open_experiment

    src = SomaCellSource(source_cfg)
    uri, tdb, _ = src.located
    with open_experiment(uri, tdb) as exp:
        obs = exp.obs.read(column_names=["soma_joinid"], value_filter=src.value_filter).concat()
    return obs.num_rows


def cell_steps(steps: dict, n_cells: int, global_batch: int) -> int:
    if steps["epochs"] is not None:
        return max(steps["min_steps"], math.ceil(steps["epochs"] * n_cells / global_batch))
    return max(steps["min_steps"], int(steps["fixed"]))


def run_ablation_cell(
    params: dict,
    ctx,
    base: dict,
    steps: dict,
    eval: dict,
    finetune: dict,
    context_tissue: str | None,
) -> dict:
    """One grid cell (a `jobs.sweep` callable): pretrain, evaluate, log to the pretraining's MLflow run."""
    import copy

    from scgpt_dist.config import ExperimentConfig, from_dict
    from scgpt_dist.train.driver import run_pretraining

    quiet_ray_data()
    model, d, tissue = params["model"], int(params["n_cells"]), params["tissue"]
    cfg: ExperimentConfig = from_dict(ExperimentConfig, copy.deepcopy(base))
    for k in MODEL_KEYS:
        setattr(cfg.model, k, int(model[k]))
    src = _source_cfg(cfg.data.source, tissue, cfg.data.source.holdout_fraction)
    pool = count_cells(src)
    where = f"tissue {tissue!r}" if tissue != WHOLE else "the source"
    src.holdout_fraction = train_holdout_fraction(pool, d, eval["holdout_fraction"], where)
    cfg.data.source = src
    global_batch = (
        cfg.train.micro_batch_size * cfg.train.num_workers * cfg.train.resolved_grad_accum()
    )
    n_steps = cell_steps(steps, d, global_batch)
    cfg.train.max_steps = n_steps
    cfg.train.warmup_steps = max(1, int(steps["warmup_fraction"] * n_steps))
    cfg.train.checkpoint_every = n_steps
    cfg.train.log_every = max(1, min(cfg.train.log_every, n_steps // 5))
    cfg.output_dir = str(ctx.out_dir / "run")
    cfg.name = f"{model['name']}-D{d}-{tissue}"
    cfg.mlflow.tracking_uri = ctx.tracking_uri
    cfg.mlflow.experiment = ctx.experiment
    cfg.mlflow.registered_model = None
    summary = run_pretraining(cfg)
    run_id = summary["run_id"]
    ctx.adopt_run(run_id)
    if "model_dir" not in summary:
        raise RuntimeError(f"cell {ctx.key} stopped at step {summary['step']} before {n_steps}")

    from jobs.sweep import _final_metric

    client = ctx.client()
    metrics = evaluate_model(summary["model_dir"], cfg, eval, context_tissue)
    tokens = _final_metric(client, run_id, "tokens_seen")
    metrics.update(
        n_train_cells=summary["n_train_cells"],
        steps=summary["step"],
        tokens_seen=tokens,
        compute_flops=6.0 * metrics["n_params"] * tokens,
        final_train_loss=_final_metric(client, run_id, "loss"),
        train_wall_s=summary["train_wall_s"],
    )
    if finetune.get("task"):
        metrics.update(_finetune(finetune, summary["model_dir"], ctx))
    for k, v in metrics.items():
        if isinstance(v, int | float) and math.isfinite(v):
            client.log_metric(run_id, k, float(v))
    for k, v in {
        "ablation.model": model["name"],
        "ablation.n_cells": d,
        "ablation.tissue": tissue,
    }.items():
        client.set_tag(run_id, k, str(v))
    return {"run_id": run_id, "model_dir": summary["model_dir"], **metrics}


def evaluation_cells(source_cfg, vocab, eval: dict, tissue: str | None):
    """(token table, tissue mask) of the fixed evaluation cells: a seeded subset of the hold-out."""
    import numpy as np

    from data_ingest import keys
    from data_ingest.source import HOLDOUT, SomaCellSource, open_experiment

    src_cfg = _source_cfg(source_cfg, WHOLE, eval["holdout_fraction"])
    src_cfg.tissues = None
    resolved = SomaCellSource(src_cfg).resolve(vocab, HOLDOUT)
    joinids = resolved.joinids
    if len(joinids) > eval["max_cells"]:
        rng = np.random.default_rng(eval["seed"])
        joinids = np.sort(rng.choice(joinids, eval["max_cells"], replace=False))
    in_tissue = np.zeros(len(joinids), bool)
    if tissue:
        with open_experiment(resolved.soma_uri, resolved.tiledb_config) as exp:
            obs = (
                exp.obs.read(
                    coords=(joinids,), column_names=["soma_joinid", keys.OBS_TISSUE_GENERAL]
                )
                .concat()
                .to_pandas()
                .set_index("soma_joinid")
                .reindex(joinids)
            )
        in_tissue = (obs[keys.OBS_TISSUE_GENERAL] == tissue).to_numpy()
    return resolved, joinids, in_tissue


def evaluate_model(model_dir: str, cfg, eval: dict, tissue: str | None) -> dict[str, float]:
    """Held-out GEP MSE (+ per-gene-mean baseline) and zero-shot kNN cell-type accuracy, overall and on
    the context tissue's evaluation cells."""
    import numpy as np

    from data_ingest import keys
    from data_ingest.datasource import read_token_table
    from data_ingest.source import TRAIN, SomaCellSource
    from scgpt_dist.evaluate import heldout_gep, knn_accuracy, with_fixed_masks
    from scgpt_dist.inference import embed_table
    from scgpt_dist.train.checkpoint import load_consolidated

    loaded = load_consolidated(model_dir)
    tok = loaded.config.data.tokenizer
    vocab = loaded.vocab
    resolved, joinids, in_tissue = evaluation_cells(cfg.data.source, vocab, eval, tissue)
    mask_ratio = loaded.config.objectives.mask_ratio
    table = with_fixed_masks(
        read_token_table(resolved, joinids, tok, vocab.cls_id), mask_ratio, eval["seed"]
    )
    train = SomaCellSource(cfg.data.source).resolve(vocab, TRAIN)
    rng = np.random.default_rng(eval["seed"])
    base_ids = train.joinids
    if len(base_ids) > eval["baseline_cells"]:
        base_ids = np.sort(rng.choice(base_ids, eval["baseline_cells"], replace=False))
    train_tab = read_token_table(train, base_ids, tok, vocab.cls_id)
    emb = embed_table(loaded, table)
    labels = table[keys.LABEL].to_numpy()
    gep = heldout_gep(loaded.model, vocab.pad_id, table, train_tab)
    out = {
        "n_params": float(loaded.model.num_params(embeddings=False)),
        "n_eval_cells": float(table.num_rows),
        FIT_METRIC: gep["model_mse"],
        "heldout_gep_mse_baseline": gep["baselines"]["per_gene_mean"],
        "knn_acc": knn_accuracy(emb, labels, k=eval["knn_k"], seed=eval["seed"]),
    }
    if tissue and in_tissue.sum() >= 10:
        sub = table.filter(in_tissue)
        g = heldout_gep(loaded.model, vocab.pad_id, sub, train_tab)
        out["heldout_gep_mse_tissue"] = g["model_mse"]
        out["knn_acc_tissue"] = knn_accuracy(
            emb[in_tissue], labels[in_tissue], k=eval["knn_k"], seed=eval["seed"]
        )
    return out


def _finetune(spec: dict, model_dir: str, ctx) -> dict[str, float]:
    from dataclasses import replace

    from jobs.sweep import JobSpec, run_finetune_cell

    job = JobSpec(
        kind="finetune", task=spec["task"], args=["--checkpoint", model_dir, *spec["args"]]
    )
    # The grid parameters describe the pretraining, not flags of the task: run it with none.
    result = run_finetune_cell(job, replace(ctx, params={}))
    return {
        f"ft_{k}": float(v)
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


# ------------------------------------------------------------------------------------------------ results


def collect_results(
    tracking_uri: str, parent_run_id: str, cell_keys: list[str] | None = None
) -> list[dict[str, Any]]:
    """One row per finished cell, read from the MLflow child runs of the ablation's parent run; with
    `cell_keys`, only the runs of those cells (a changed base config makes new cells under the same parent:
    the old ones stay in MLflow but are not this grid's)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.{PARENT_RUN_TAG} = '{parent_run_id}'",
        max_results=10000,
    )
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if "ablation.model" not in tags or FIT_METRIC not in metrics:
            continue  # unfinished cell (or not an ablation run)
        if cell_keys is not None and tags.get("sweep.cell") not in cell_keys:
            continue
        rows.append(
            {
                "model": tags["ablation.model"],
                "tissue": tags["ablation.tissue"],
                "n_cells": int(tags["ablation.n_cells"]),
                **metrics,
                "run_id": run.info.run_id,
            }
        )
    rows.sort(key=lambda r: (r["tissue"] != WHOLE, r.get("n_params", 0), r["n_cells"]))
    return rows


TABLE_COLUMNS = (
    "model",
    "tissue",
    "n_cells",
    "n_params",
    "n_train_cells",
    "steps",
    "compute_flops",
    "final_train_loss",
    FIT_METRIC,
    "heldout_gep_mse_baseline",
    "knn_acc",
    "heldout_gep_mse_tissue",
    "knn_acc_tissue",
)


def monotone_trends(rows: list[dict]) -> dict[str, bool]:
    """Does the held-out loss fall with D at every N, and with N at every D (whole-census cells)?"""
    whole = [r for r in rows if r["tissue"] == WHOLE]
    by_n: dict[float, list] = {}
    by_d: dict[int, list] = {}
    for r in whole:
        by_n.setdefault(r["n_params"], []).append((r["n_cells"], r[FIT_METRIC]))
        by_d.setdefault(r["n_cells"], []).append((r["n_params"], r[FIT_METRIC]))

    def falling(groups):
        return all(
            all(b[1] < a[1] for a, b in zip(s, s[1:], strict=False))
            for s in (sorted(v) for v in groups.values())
        )

    return {"loss_falls_with_D": falling(by_n), "loss_falls_with_N": falling(by_d)}


def pca_knn_reference(cfg: ScaleAblationConfig) -> float:
    """kNN cell-type accuracy of a 50-PC PCA of the (log-normalized) evaluation cells: the reference line
    for the zero-shot embeddings."""
    import numpy as np
    import tiledbsoma

    from data_ingest import keys
    from data_ingest.source import SomaCellSource, open_experiment
    from data_ingest.vocab import GeneVocab
    from scgpt_dist.config import ExperimentConfig, from_dict
    from scgpt_dist.evaluate import knn_accuracy, pca_embedding

    base = from_dict(ExperimentConfig, cfg.base)
    if "://" not in base.data.source.soma_uri:
        base.data.source.soma_uri = str(Path(base.data.source.soma_uri).resolve())
    vocab = GeneVocab.from_genes(SomaCellSource(base.data.source).gene_names())
    resolved, joinids, _ = evaluation_cells(base.data.source, vocab, asdict(cfg.eval), None)
    with open_experiment(resolved.soma_uri, resolved.tiledb_config) as exp:
        query = exp.axis_query(
            resolved.measurement, obs_query=tiledbsoma.AxisQuery(coords=(joinids,))
        )
        adata = query.to_anndata(X_name=resolved.layer)
    labels = adata.obs[resolved.label_key or keys.OBS_CELL_TYPE].astype(str).to_numpy()
    emb = pca_embedding(adata.X, 50, log_normalize=True, seed=cfg.eval.seed)
    return knn_accuracy(np.asarray(emb), labels, k=cfg.eval.knn_k, seed=cfg.eval.seed)


def write_ablation_report(
    cfg: ScaleAblationConfig,
    rows: list[dict],
    out_dir: Path,
    pca_knn: float | None = None,
):
    """Table, fit with CIs, loss vs compute, downstream accuracy vs D, the context arm; returns (path, fit)."""
    import numpy as np

    from jobs.report import Report
    from jobs.scaling_law import fit_scaling_law

    fit_max_exponent = 3.0

    rep = Report(f"Scale ablation {cfg.name}", out_dir)
    whole = [r for r in rows if r["tissue"] == WHOLE]
    rep.text(
        f"{len(cfg.models)} model sizes x {len(cfg.n_cells)} pretraining cell counts on "
        f"`{cfg.base.get('data', {}).get('source', {}).get('soma_uri', '?')}`"
        + (f", plus an organ-restricted arm ({cfg.context.tissue})" if cfg.context.tissue else "")
        + f". N = non-embedding parameters, D = training cells, compute = 6 N x tokens seen. "
        f"{FIT_METRIC}: masked-value MSE (bins) on {int(rows[0].get('n_eval_cells', 0)) if rows else 0} "
        "evaluation cells held out of every run; knn_acc: 5-fold kNN cell-type accuracy of the zero-shot "
        "embeddings of the same cells."
    )
    rep.table("Cells", [{c: r.get(c, float("nan")) for c in TABLE_COLUMNS} for r in rows])
    if not whole:
        rep.text("No finished whole-census cells yet: nothing to fit or plot.")
        return rep.write(), None
    trends = monotone_trends(rows)
    rep.results["trends"] = trends
    rep.text(
        "Monotone trends (whole census): held-out loss falls with D at every N: "
        f"**{trends['loss_falls_with_D']}**; falls with N at every D: **{trends['loss_falls_with_N']}**."
    )

    fit = None
    n = np.array([r["n_params"] for r in whole], float)
    d = np.array([r["n_train_cells"] for r in whole], float)
    loss = np.array([r[FIT_METRIC] for r in whole], float)
    try:
        fit = fit_scaling_law(
            n,
            d,
            loss,
            n_bootstrap=cfg.fit.bootstrap,
            level=cfg.fit.level,
            seed=cfg.fit.seed,
            max_exponent=fit_max_exponent,
        )
    except ValueError as err:
        rep.text(f"No scaling-law fit: {err}")
    if fit is not None:
        rep.results["fit"] = fit.to_dict()
        rep.table(
            f"Fit L(N, D) = E + A/N^alpha + B/D^beta on {FIT_METRIC} ({fit.n_points} points, "
            f"{fit.n_bootstrap} bootstrap refits, RMSE in log L {fit.rmse_log:.3g})",
            fit.rows(),
        )
        rep.text(
            "With few grid points the exponents are weakly identified: read the intervals, not the "
            "point estimates. E is the irreducible loss of this data and objective."
        )
        for term, exp in (("N", "alpha"), ("D", "beta")):
            p = fit.params[exp]
            if p < 1e-3 or p > 0.99 * fit_max_exponent:
                rep.text(
                    f"**The {term} term is degenerate** ({exp} = {p:.3g}, at a bound of [0, "
                    f"{fit_max_exponent:g}]): in this grid the loss does not fall as a power of {term}, "
                    "so the fit cannot measure its exponent. Do not read it as a scaling law in "
                    f"{term}."
                )
    _plot_loss_vs_compute(rep, whole, fit)
    _plot_metric_vs_d(rep, whole, pca_knn)
    if pca_knn is not None:
        rep.results["pca50_knn_acc"] = pca_knn
        best = max(r["knn_acc"] for r in whole)
        rep.text(
            f"Reference: kNN accuracy of a 50-PC PCA of the same evaluation cells (log-normalized counts) is "
            f"{pca_knn:.3f}; the best zero-shot embedding here reaches {best:.3f}"
            + (" — PCA wins." if pca_knn > best else ".")
        )
    if cfg.context.tissue:
        _context_table(rep, rows, cfg.context.tissue)
    return rep.write(), fit


def _plot_loss_vs_compute(rep, whole, fit) -> None:
    import numpy as np

    fig = rep.figure("loss_vs_compute")
    ax = fig.add_subplot(1, 1, 1)
    for model in sorted({r["model"] for r in whole}, key=lambda m: _n_of(whole, m)):
        pts = sorted(
            (r["compute_flops"], r[FIT_METRIC], r["n_train_cells"])
            for r in whole
            if r["model"] == model
        )
        c, loss, d = map(np.array, zip(*pts, strict=True))
        (line,) = ax.plot(c, loss, "o", label=f"{model} (N={_n_of(whole, model):,.0f})")
        if fit is not None:
            ax.plot(
                c,
                fit.predict(np.full_like(d, _n_of(whole, model)), d),
                "-",
                color=line.get_color(),
                alpha=0.6,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    baseline = [r["heldout_gep_mse_baseline"] for r in whole if "heldout_gep_mse_baseline" in r]
    if baseline:
        ax.axhline(
            float(np.mean(baseline)), color="grey", ls="--", label="per-gene-mean baseline (mean)"
        )
    ax.set_xlabel("compute C = 6 N x tokens (FLOPs)")
    ax.set_ylabel("held-out GEP MSE")
    ax.set_title("Loss vs compute (lines: fitted L(N, D))")
    ax.legend(fontsize=8)


def _plot_metric_vs_d(rep, whole, pca_knn: float | None = None) -> None:
    fig = rep.figure("knn_acc_vs_cells")
    ax = fig.add_subplot(1, 1, 1)
    for model in sorted({r["model"] for r in whole}, key=lambda m: _n_of(whole, m)):
        pts = sorted((r["n_train_cells"], r["knn_acc"]) for r in whole if r["model"] == model)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"{model} (N={_n_of(whole, model):,.0f})")
    ax.set_xscale("log")
    if pca_knn is not None:
        ax.axhline(pca_knn, color="grey", ls="--", label="PCA-50 (log-normalized counts)")
    ax.set_xlabel("pretraining cells D")
    ax.set_ylabel("kNN cell-type accuracy (zero-shot)")
    ax.set_title("Downstream metric vs data")
    ax.legend(fontsize=8)


def _n_of(rows, model: str) -> float:
    return next(r["n_params"] for r in rows if r["model"] == model)


def _context_table(rep, rows, tissue: str) -> None:
    pairs = []
    for r in rows:
        if r["tissue"] != tissue:
            continue
        twin = next(
            (
                w
                for w in rows
                if w["tissue"] == WHOLE
                and w["model"] == r["model"]
                and w["n_cells"] == r["n_cells"]
            ),
            None,
        )
        for arm in (r, twin):
            if arm is not None:
                pairs.append(
                    {
                        "pretrained on": arm["tissue"],
                        "model": arm["model"],
                        "n_cells": arm["n_cells"],
                        f"GEP MSE on {tissue}": arm.get("heldout_gep_mse_tissue", float("nan")),
                        f"kNN acc on {tissue}": arm.get("knn_acc_tissue", float("nan")),
                        "GEP MSE on all": arm[FIT_METRIC],
                        "kNN acc on all": arm["knn_acc"],
                    }
                )
    rep.table(f"Context arm: {tissue}-only vs whole-census pretraining (same N and D)", pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.scale_ablation", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="jobs/configs/scale_ablation_*.yaml")
    parser.add_argument(
        "--report-only", action="store_true", help="run no cells; collect, fit and report"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_ablation_config(args.config, args.overrides)
    result = run_ablation(cfg, report_only=args.report_only)
    print(Path(result["report"]).read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=str))
    return 1 if result["failed"] else 0


def run_ablation(cfg: ScaleAblationConfig, report_only: bool = False) -> dict:
    """Run the grid (resuming), collect from MLflow, fit, report (also as the parent run's artifacts)."""
    import os

    from mlflow.tracking import MlflowClient

    from jobs.sweep import init_ray, run_sweep

    scfg = sweep_config(cfg)
    if not report_only:
        workers = cfg.base.get("train", {}).get("num_workers", 2)
        init_ray(cfg.ray_address, cfg.ray_num_cpus or (os.cpu_count() or 1) + workers + 1)
    sweep = run_sweep(scfg, dry_run=report_only)
    rows = collect_results(sweep.tracking_uri, sweep.parent_run_id, [r["cell"] for r in sweep.rows])
    out = Path(cfg.output_dir).resolve() / "ablation_report"
    pca_knn = pca_knn_reference(cfg) if rows else None
    report, fit = write_ablation_report(cfg, rows, out, pca_knn)
    client = MlflowClient(sweep.tracking_uri)
    client.log_artifacts(sweep.parent_run_id, str(out), artifact_path="ablation_report")
    if fit is not None:
        for k, v in fit.params.items():
            client.log_metric(sweep.parent_run_id, f"fit_{k}", v)
    return {
        "report": str(report),
        "parent_run_id": sweep.parent_run_id,
        "tracking_uri": sweep.tracking_uri,
        "rows": rows,
        "fit": fit.to_dict() if fit else None,
        "ran": sweep.ran,
        "reused": sweep.reused,
        "failed": sweep.failed,
    }


if __name__ == "__main__":
    import sys

    from jobs.scale_ablation import main as _main  # Ray pickles cell functions by module reference

    run_main(lambda: _main(sys.argv[1:]))

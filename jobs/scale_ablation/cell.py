"""One grid cell of the scale ablation (a `jobs.sweep` callable): pretrain on D cells, evaluate the model,
log N, D, tokens and compute with the metrics to its MLflow run."""

from __future__ import annotations

import logging
import math

from data_ingest import keys
from data_ingest.datasource import read_token_table
from data_ingest.source import HOLDOUT, TRAIN, SomaCellSource, open_experiment
from jobs._cli import quiet_ray_data
from jobs.scale_ablation.config import FIT_METRIC, MODEL_KEYS, WHOLE
from jobs.sweep.cells import final_metric, run_finetune_cell
from jobs.sweep.config import JobSpec
from scgpt_dist.config import ExperimentConfig, from_dict
from scgpt_dist.evaluate import heldout_gep, knn_accuracy, with_fixed_masks
from scgpt_dist.inference import embed_table
from scgpt_dist.train.checkpoint import load_consolidated
from scgpt_dist.train.driver import run_pretraining

log = logging.getLogger(__name__)


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

    client = ctx.client()
    metrics = evaluate_model(summary["model_dir"], cfg, eval, context_tissue)
    tokens = final_metric(client, run_id, "tokens_seen")
    metrics.update(
        n_train_cells=summary["n_train_cells"],
        steps=summary["step"],
        tokens_seen=tokens,
        compute_flops=6.0 * metrics["n_params"] * tokens,
        final_train_loss=final_metric(client, run_id, "loss"),
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

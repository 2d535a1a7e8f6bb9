"""Cell-type annotation: finetune with the CLS objective on a reference split, predict the query split.

Compared on the same split: the finetuned scGPT, a from-scratch scGPT (same architecture and training, random
initial weights: the paper's control), L1 logistic regression on log-normalised HVGs and logistic regression on
a 50-PC PCA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from scgpt_dist.inference import tokenize_anndata
from scgpt_dist.model.config import ObjectiveConfig
from scgpt_dist.preprocess import log_normalize
from scgpt_dist.tasks.annotation import method as an
from scgpt_dist.tasks.config import TaskConfig, arg
from scgpt_dist.tasks.finetune import FinetuneConfig, adapt_model, finetune, run_model, with_labels
from scgpt_dist.tasks.runner import TaskContext, load_cells
from scgpt_dist.train.checkpoint import load_consolidated

DESCRIPTION = (
    "cell-type annotation: CLS finetuning vs from-scratch scGPT and logistic-regression baselines"
)


@dataclass
class AnnotationConfig(TaskConfig):
    """Cell-type annotation settings (besides the common ones)."""

    label_key: str = arg("cell_type", "obs column with the cell types")
    query_key: str | None = arg(None, "obs column that defines the query set (e.g. dataset_id)")
    query_values: list[str] | None = arg(None, "values of --query-key that are the query")
    query_fraction: float = arg(0.3, "without --query-key: stratified random query fraction")
    epochs: int = arg(15)
    lr: float = arg(
        2e-3,
        "AdamW learning rate. The reference uses 1e-4 for its 12-layer, 512-d model over tens of "
        "thousands of cells; small models on a few hundred cells need a larger rate",
    )
    batch_size: int = arg(32)
    no_scratch: bool = arg(False, "skip the from-scratch scGPT control")
    n_hvg: int = arg(2000, "HVGs for the baselines")


def run(cfg: AnnotationConfig, ctx: TaskContext) -> dict:

    adata = load_cells(cfg.data, cfg.obs_filter, cfg.max_cells, cfg.seed)
    if cfg.label_key not in adata.obs:
        raise ValueError(
            f"--label-key {cfg.label_key!r} is not an obs column; have {list(adata.obs)}"
        )
    split = an.split_cells(
        adata.obs, cfg.label_key, cfg.query_key, cfg.query_values, cfg.query_fraction, cfg.seed
    )
    names, y = np.unique(adata.obs[cfg.label_key].astype(str).to_numpy(), return_inverse=True)
    y_query = y[split.query]
    rows, preds, seconds = [], {}, {}

    X = log_normalize(adata.X)
    for method, fn in (("logreg_l1_hvg", an.logreg_hvg), ("logreg_pca50", an.logreg_pca)):
        t0 = time.perf_counter()
        preds[method] = fn(X, y, split, n_hvg=cfg.n_hvg, seed=cfg.seed)
        seconds[method] = time.perf_counter() - t0

    history = {}
    if cfg.checkpoint:
        loaded = load_consolidated(cfg.checkpoint)
        table = with_labels(
            tokenize_anndata(adata, loaded.vocab, loaded.config.data.tokenizer), y, np.zeros(len(y))
        )
        ref_table, query_table = table.take(split.reference), table.take(split.query)
        ft = FinetuneConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            objectives=ObjectiveConfig(gep=0.0, gepc=0.0, cls=1.0),
        )
        arms = [("scgpt_finetuned", False)] + ([] if cfg.no_scratch else [("scgpt_scratch", True)])
        for method, scratch in arms:
            t0 = time.perf_counter()
            # Annotation finetuning takes no batch labels (as the reference tutorial); the CLS head is new.
            model, _ = adapt_model(
                loaded,
                from_scratch=scratch,
                seed=cfg.seed,
                n_cls=len(names),
                use_batch_labels=False,
                domain_spec_batchnorm="none",
                do_dab=False,
            )
            history[method] = finetune(
                model,
                ref_table,
                ft,
                on_epoch=lambda e, m, p=method: ctx.log_metrics(
                    {f"{p}/{k}": v for k, v in m.items()}, e
                ),
            )
            preds[method] = run_model(model, query_table)["cls_logits"].argmax(1)
            seconds[method] = time.perf_counter() - t0

    metrics = {}
    for method, pred in preds.items():
        m = an.classification_metrics(y_query, pred)
        rows.append({"method": method, **m, "seconds": seconds[method]})
        metrics.update({f"{method}/{k}": v for k, v in m.items()})
    rows.sort(key=lambda r: -r["macro_f1"])

    rep = ctx.report
    rep.text(
        f"{adata.n_obs} cells, {len(names)} cell types (`{cfg.label_key}`); split: {split.how}; "
        f"{len(split.reference)} reference and {len(split.query)} query cells."
        + (
            f" scGPT: {cfg.epochs} epochs, lr {cfg.lr}, batch {cfg.batch_size}, CLS objective."
            if cfg.checkpoint
            else " No checkpoint given: baselines only."
        )
    )
    rep.table("Query-set annotation (sorted by macro F1)", rows)
    best = rows[0]["method"]
    lead = "scgpt_finetuned" if "scgpt_finetuned" in preds else best
    if lead != best:
        rep.text(
            f"**{best}** beats the finetuned scGPT here "
            f"(macro F1 {rows[0]['macro_f1']:.3f} vs "
            f"{metrics['scgpt_finetuned/macro_f1']:.3f})."
        )
    _confusion(rep, y_query, preds[lead], names, lead)
    if history:
        fig = rep.figure("finetune_loss", 5, 3.5)
        ax = fig.add_subplot(111)
        for method, h in history.items():
            ax.plot(range(1, len(h) + 1), [e["cls"] for e in h], marker="o", label=method)
        ax.set_xlabel("epoch")
        ax.set_ylabel("CLS cross-entropy (reference split)")
        ax.legend()
    return metrics


def _confusion(rep, y_true, y_pred, names, method: str) -> None:
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=np.arange(len(names))).astype(float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(names) + 2)
    fig = rep.figure("confusion", size, size)
    ax = fig.add_subplot(111)
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{method}: row-normalised confusion (query)")
    fig.colorbar(im, ax=ax, fraction=0.046)

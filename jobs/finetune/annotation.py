"""Cell-type annotation: finetune with the CLS objective on a reference split, predict the query split.

Compared on the same split: the finetuned scGPT, a from-scratch scGPT (same architecture and training, random
initial weights: the paper's control), L1 logistic regression on log-normalised HVGs and logistic regression on
a 50-PC PCA.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jobs.finetune.common import load_cells
from scgpt_dist import annotation as an
from scgpt_dist.config import ObjectiveConfig
from scgpt_dist.finetune import FinetuneConfig, adapt_model, finetune, run_model, with_labels
from scgpt_dist.inference import tokenize_anndata
from scgpt_dist.preprocess import log_normalize
from scgpt_dist.train.checkpoint import load_consolidated

DESCRIPTION = (
    "cell-type annotation: CLS finetuning vs from-scratch scGPT and logistic-regression baselines"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-key", default="cell_type", help="obs column with the cell types")
    parser.add_argument(
        "--query-key", help="obs column that defines the query set (e.g. dataset_id)"
    )
    parser.add_argument(
        "--query-values", nargs="+", help="values of --query-key that are the query"
    )
    parser.add_argument(
        "--query-fraction",
        type=float,
        default=0.3,
        help="without --query-key: stratified random query fraction",
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="AdamW learning rate. The reference uses 1e-4 for its 12-layer, 512-d model over tens of "
        "thousands of cells; small models on a few hundred cells need a larger rate",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--no-scratch", action="store_true", help="skip the from-scratch scGPT control"
    )
    parser.add_argument("--n-hvg", type=int, default=2000, help="HVGs for the baselines")


def run(args: argparse.Namespace, ctx) -> dict:

    adata = load_cells(args.data, args.obs_filter, args.max_cells, args.seed)
    if args.label_key not in adata.obs:
        raise ValueError(
            f"--label-key {args.label_key!r} is not an obs column; have {list(adata.obs)}"
        )
    split = an.split_cells(
        adata.obs, args.label_key, args.query_key, args.query_values, args.query_fraction, args.seed
    )
    names, y = np.unique(adata.obs[args.label_key].astype(str).to_numpy(), return_inverse=True)
    y_query = y[split.query]
    rows, preds, seconds = [], {}, {}

    X = log_normalize(adata.X)
    for method, fn in (("logreg_l1_hvg", an.logreg_hvg), ("logreg_pca50", an.logreg_pca)):
        t0 = time.perf_counter()
        preds[method] = fn(X, y, split, n_hvg=args.n_hvg, seed=args.seed)
        seconds[method] = time.perf_counter() - t0

    history = {}
    if args.checkpoint:
        loaded = load_consolidated(args.checkpoint)
        table = with_labels(
            tokenize_anndata(adata, loaded.vocab, loaded.config.data.tokenizer), y, np.zeros(len(y))
        )
        ref_table, query_table = table.take(split.reference), table.take(split.query)
        ft = FinetuneConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            objectives=ObjectiveConfig(gep=0.0, gepc=0.0, cls=1.0),
        )
        arms = [("scgpt_finetuned", False)] + ([] if args.no_scratch else [("scgpt_scratch", True)])
        for method, scratch in arms:
            t0 = time.perf_counter()
            # Annotation finetuning takes no batch labels (as the reference tutorial); the CLS head is new.
            model, _ = adapt_model(
                loaded,
                from_scratch=scratch,
                seed=args.seed,
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
        f"{adata.n_obs} cells, {len(names)} cell types (`{args.label_key}`); split: {split.how}; "
        f"{len(split.reference)} reference and {len(split.query)} query cells."
        + (
            f" scGPT: {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, CLS objective."
            if args.checkpoint
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

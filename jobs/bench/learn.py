"""Does pretraining buy something? Pretrain through the real pipeline, then score on held-out cells.

    python -m jobs.bench learn --soma-uri URI --label-key cell_type --batch-key dataset_id --out DIR
        [--obs-filter "is_primary_data == True"] [--config jobs/configs/learn.yaml] [key.sub=value ...]

1. Pretrains with `jobs.pretrain`'s code (Ray Train, `train.num_workers` workers, DeepSpeed ZeRO, MLflow, the
   in-training evaluation callback) on the experiment's training cells for the preset's fixed step budget.
2. On a fixed sample of held-out cells (the hash split of `data.source.holdout_fraction`) reports:
   held-out GEP MSE next to the context-free baselines (per-gene mean, per-gene x batch mean, per-gene x
   cell-type mean: the context ceiling) for the trained model and the same model at initialisation; kNN and
   linear-probe cell-type accuracy of `X_scGPT`, of PCA-50 and of the model at initialisation; mean pairwise
   cosine; batch kNN; annotation finetuning macro-F1 from the pretrained model and from scratch on a small
   labelled subset (several seeds); time to learning (first in-training evaluation whose GEP beats the
   per-gene x batch mean).
3. Writes `DIR/learn.json`, `DIR/heldout.h5ad` (raw counts in X, obs label and batch, `obsm["X_scGPT"]`),
   `DIR/learn.md` with the loss curve and a UMAP (`DIR/*.png`).

Labels and batches are read by the keys given, so any census-layout experiment works.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_ingest import keys
from data_ingest.source import SomaCellSource
from jobs._cli import CONFIG_DIR, quiet_ray_data, setup_logging
from jobs.demo import export_cells
from scgpt_dist.config import ObjectiveConfig, load_config
from scgpt_dist.evaluate import (
    embedding_scores,
    gap_closed,
    gep_baselines,
    heldout_tables,
    knn_accuracy,
    linear_probe_accuracy,
    model_scores,
    pca_embedding,
    type_only_batch_knn,
)
from scgpt_dist.inference import EMBEDDING_KEY
from scgpt_dist.model.transformer import build_model
from scgpt_dist.preprocess import is_count_matrix
from scgpt_dist.tasks.annotation.method import classification_metrics
from scgpt_dist.tasks.finetune import FinetuneConfig, adapt_model, finetune, run_model
from scgpt_dist.train.checkpoint import load_consolidated
from scgpt_dist.train.driver import run_pretraining

DEFAULT_CONFIG = str(Path(CONFIG_DIR) / "learn.yaml")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench learn", description=__doc__.split("\n")[0]
    )
    p.add_argument("--soma-uri", required=True, help="census-layout experiment or collection")
    p.add_argument("--obs-filter", default=None, help="SOMA obs filter of the cells to use")
    p.add_argument("--label-key", default="cell_type", help="obs column of the cell-type labels")
    p.add_argument("--batch-key", default="dataset_id", help="obs column of the batches (datasets)")
    p.add_argument("--layer", default=None, help="X layer (default: the preset's, `raw`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="pretraining preset (the step budget)")
    p.add_argument("--eval-cells", type=int, default=2000, help="held-out cells scored at the end")
    p.add_argument("--finetune-cells", type=int, default=300, help="labelled cells for annotation")
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=3, help="annotation finetuning seeds (>= 3)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the preset")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.eval_cells < 50 or args.finetune_cells < 10:
        raise ValueError("--seeds >= 1, --eval-cells >= 50 and --finetune-cells >= 10, please")
    if "://" not in args.soma_uri and not Path(args.soma_uri).exists():
        raise FileNotFoundError(
            f"--soma-uri {args.soma_uri} does not exist; pass a census-layout SOMA experiment or collection "
            "(e.g. one written by python -m data_ingest.synth --out DIR)"
        )
    return args


def pretrain(args: argparse.Namespace, out: Path) -> tuple[dict, object]:

    cfg = load_config(args.config, args.overrides)
    src = cfg.data.source
    src.soma_uri, src.value_filter = args.soma_uri, args.obs_filter
    src.label_key, src.batch_key = args.label_key, args.batch_key
    if args.layer:
        src.layer = args.layer
    cfg.data.build_demo = False
    cfg.output_dir = str(out / "run")
    if cfg.eval.every <= 0:
        cfg.eval.every = max(1, cfg.train.max_steps // 20)
    quiet_ray_data()
    summary = run_pretraining(cfg)
    if "model_dir" not in summary:
        raise RuntimeError("pretraining stopped before train.max_steps; run the command again")
    return summary, cfg


def learning_curve(summary: dict) -> dict:
    """Training loss and in-training evaluation histories from the run, and the time to learning."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    hist = {}
    for key in (
        "loss",
        "eval/gep_mse",
        "eval/baseline_per_gene_mean",
        "eval/baseline_per_gene_batch_mean",
        "eval/baseline_per_gene_type_mean",
        "eval/knn_type",
        "eval/mean_cosine",
    ):
        rows = sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.step)
        hist[key] = [(m.step, m.value, m.timestamp) for m in rows]
    gep, batch_mean = (
        hist["eval/gep_mse"],
        dict((s, v) for s, v, _ in hist["eval/baseline_per_gene_batch_mean"]),
    )
    t0 = gep[0][2] if gep else None
    learned = next(
        ((s, (t - t0) / 60000) for s, v, t in gep if s in batch_mean and v < batch_mean[s]),
        (None, None),
    )
    return {"history": hist, "steps_to_learning": learned[0], "minutes_to_learning": learned[1]}


def embedding_metrics(emb, labels, batches, seed: int) -> dict[str, float]:

    out = embedding_scores(emb, labels, batches, seed=seed)
    out["linear_probe_type"] = linear_probe_accuracy(emb, labels, seed=seed)
    return out


def annotation(loaded, held, args) -> dict:
    """CLS finetuning from the pretrained model and from scratch on `--finetune-cells` labelled held-out
    cells; macro-F1 on the rest of the sample, per seed."""
    import numpy as np
    import pyarrow as pa

    table = held.drop_columns(["eval_mask"])
    labels = table[keys.LABEL].to_numpy()
    classes = np.unique(labels)
    codes = np.searchsorted(classes, labels).astype(np.int32)
    table = table.set_column(table.column_names.index(keys.LABEL), keys.LABEL, pa.array(codes))
    rows = {"pretrained": [], "scratch": []}
    for seed in range(args.seeds):
        perm = np.random.default_rng(seed).permutation(table.num_rows)
        n_train = min(args.finetune_cells, table.num_rows // 2)
        train, test = np.sort(perm[:n_train]), np.sort(perm[n_train:])
        for arm, scratch in (("pretrained", False), ("scratch", True)):
            model, _ = adapt_model(loaded, from_scratch=scratch, seed=seed, n_cls=len(classes))
            cfg = FinetuneConfig(
                epochs=args.finetune_epochs,
                lr=args.finetune_lr,
                seed=seed,
                objectives=ObjectiveConfig(gep=0.0, gepc=0.0, cls=1.0),
            )
            finetune(model, table.take(pa.array(train)), cfg)
            logits = run_model(model, table.take(pa.array(test)))["cls_logits"]
            f1 = classification_metrics(codes[test], logits.argmax(1))["macro_f1"]
            rows[arm].append(f1)
    pre, scr = np.array(rows["pretrained"]), np.array(rows["scratch"])
    return {
        "pretrained_macro_f1": float(pre.mean()),
        "pretrained_macro_f1_sd": float(pre.std()),
        "scratch_macro_f1": float(scr.mean()),
        "scratch_macro_f1_sd": float(scr.std()),
        "per_seed": rows,
        "seeds": args.seeds,
        "labelled_cells": int(min(args.finetune_cells, table.num_rows // 2)),
    }


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(sys.argv[2:] if argv is None else argv)
    setup_logging()
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import numpy as np
    import ray
    import torch

    ours = not ray.is_initialized()
    summary, cfg = pretrain(args, out)
    if ours:
        ray.shutdown()  # training is done; the rest runs in this process
    train_minutes = summary["train_wall_s"] / 60
    loaded = load_consolidated(summary["model_dir"])
    source = SomaCellSource(cfg.data.source)
    held, train, held_src = heldout_tables(
        cfg, source, loaded.vocab, args.eval_cells, cfg.eval.seed
    )
    baselines = gep_baselines(train, held, loaded.vocab.pad_id)
    labels = held[keys.LABEL].to_numpy()
    batches = held[keys.BATCH].to_numpy()
    generative = cfg.objectives.generative

    se, n, emb = model_scores(loaded.model, loaded.vocab.pad_id, held, generative=generative)
    torch.manual_seed(cfg.train.seed)  # the pretraining run's initial weights
    init_model = build_model(loaded.config.model, len(loaded.vocab), loaded.vocab.pad_id)
    se0, n0, emb0 = model_scores(init_model, loaded.vocab.pad_id, held, generative=generative)

    # Held-out cells as a user would get them, with the embedding, and PCA-50 of the same cells.
    ids = held[keys.CELL_ID].to_numpy()
    adata = export_cells(held_src.soma_uri, held_src.layer, ids, out / "heldout.h5ad")
    order = np.searchsorted(ids, adata.obs["soma_joinid"].to_numpy())
    adata.obsm[EMBEDDING_KEY] = emb[order]
    adata.write_h5ad(out / "heldout.h5ad")
    pca = pca_embedding(adata.X, 50, log_normalize=is_count_matrix(adata.X))
    pca = pca[np.argsort(order)]  # back to the token table's row order

    scgpt = embedding_metrics(emb, labels, batches, cfg.eval.seed)
    init = embedding_metrics(emb0, labels, batches, cfg.eval.seed)
    pca_scores = {
        "knn_type": knn_accuracy(pca, labels, seed=cfg.eval.seed),
        "linear_probe_type": linear_probe_accuracy(pca, labels, seed=cfg.eval.seed),
        "knn_batch": knn_accuracy(pca, batches, seed=cfg.eval.seed),
    }
    curve = learning_curve(summary)
    ann = annotation(loaded, held, args)
    gep = se / max(n, 1)
    _, counts = np.unique(labels, return_counts=True)
    _, bcounts = np.unique(batches, return_counts=True)
    result = {
        "soma_uri": args.soma_uri,
        "obs_filter": args.obs_filter,
        "label_key": args.label_key,
        "batch_key": args.batch_key,
        "config": args.config,
        "overrides": args.overrides,
        "train_cells": summary["n_train_cells"],
        "heldout_cells_scored": int(held.num_rows),
        "steps": summary["step"],
        "gep_mse": gep,
        "gep_mse_random_init": se0 / max(n0, 1),
        "gep_baselines": baselines,
        "gep_gap_closed": gap_closed(gep, baselines),
        "knn_type_scgpt": scgpt["knn_type"],
        "knn_type_pca": pca_scores["knn_type"],
        "knn_type_random_init": init["knn_type"],
        "linear_probe_type_scgpt": scgpt["linear_probe_type"],
        "linear_probe_type_pca": pca_scores["linear_probe_type"],
        "linear_probe_type_random_init": init["linear_probe_type"],
        "mean_cosine": scgpt["mean_cosine"],
        "mean_cosine_random_init": init["mean_cosine"],
        "knn_batch_scgpt": scgpt.get("knn_batch"),
        "knn_batch_pca": pca_scores["knn_batch"],
        "knn_batch_type_only": type_only_batch_knn(labels, batches, seed=cfg.eval.seed),
        "chance_type": float((counts / counts.sum()).max()),
        "chance_batch": float((bcounts / bcounts.sum()).max()),
        "annotation": ann,
        "steps_to_learning": curve["steps_to_learning"],
        "minutes_to_learning": curve["minutes_to_learning"],
        "train_minutes": train_minutes,
        "mlflow": {"tracking_uri": summary["tracking_uri"], "run_id": summary["run_id"]},
        "model_dir": summary["model_dir"],
    }
    result["minutes"] = (time.perf_counter() - t_start) / 60
    (out / "learn.json").write_text(json.dumps(result, indent=1))
    write_report(out, result, curve["history"], adata, labels_key=args.label_key)
    print(format_summary(result))
    return 0


def write_report(out: Path, r: dict, hist: dict, adata, labels_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    loss = hist["loss"]
    ax[0].plot([s for s, _, _ in loss], [v for _, v, _ in loss])
    ax[0].set(xlabel="step", ylabel="training loss (GEP + GEPC)", yscale="log")
    for key, style in (
        ("eval/gep_mse", "-o"),
        ("eval/baseline_per_gene_mean", "--"),
        ("eval/baseline_per_gene_batch_mean", "--"),
        ("eval/baseline_per_gene_type_mean", "--"),
    ):
        h = hist[key]
        ax[1].plot([s for s, _, _ in h], [v for _, v, _ in h], style, label=key.split("/")[1])
    gep = [v for _, v, _ in hist["eval/gep_mse"]]
    if gep:
        top = max(hist["eval/baseline_per_gene_mean"][0][1] * 1.5, min(gep))
        ax[1].set_ylim(0, top)
    ax[1].set(xlabel="step", ylabel="held-out GEP MSE")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=110)
    plt.close(fig)

    import scanpy as sc

    view = adata.copy()
    sc.pp.neighbors(view, use_rep=EMBEDDING_KEY, n_neighbors=15, random_state=0)
    sc.tl.umap(view, random_state=0)
    batch_col = r["batch_key"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 5))
    for a, col in zip(ax, (labels_key, batch_col), strict=True):
        sc.pl.umap(view, color=col, ax=a, show=False, legend_loc=None, title=f"X_scGPT by {col}")
    fig.tight_layout()
    fig.savefig(out / "umap.png", dpi=110)
    plt.close(fig)

    b = r["gep_baselines"]
    ann = r["annotation"]
    lines = [
        "# Learning benchmark",
        "",
        f"Experiment `{r['soma_uri']}` (filter `{r['obs_filter']}`), labels `{r['label_key']}`, batches "
        f"`{r['batch_key']}`; {r['train_cells']} training cells, {r['heldout_cells_scored']} held-out "
        f"cells scored; preset `{r['config']}` {' '.join(r['overrides'])}; {r['steps']} steps.",
        "",
        "| held-out GEP MSE | value |",
        "| --- | ---: |",
        f"| pretrained model | {r['gep_mse']:.2f} |",
        f"| same model at initialisation | {r['gep_mse_random_init']:.2f} |",
        f"| per-gene mean | {b['per_gene_mean']:.2f} |",
        f"| per-gene x batch mean | {b['per_gene_batch_mean']:.2f} |",
    ]
    if "per_gene_type_mean" in b:
        lines.append(
            f"| per-gene x cell-type mean (context ceiling) | {b['per_gene_type_mean']:.2f} |"
        )
    if r["gep_gap_closed"] is not None:
        lines.append(
            f"| share of the per-gene -> per-gene x type gap closed | {r['gep_gap_closed']:.2f} |"
        )
    lines += [
        "",
        "| cell embedding | kNN cell type | linear probe | batch kNN | mean cosine |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| X_scGPT (pretrained) | {r['knn_type_scgpt']:.3f} | {r['linear_probe_type_scgpt']:.3f} | "
        f"{r['knn_batch_scgpt']:.3f} | {r['mean_cosine']:.3f} |",
        f"| same model at initialisation | {r['knn_type_random_init']:.3f} | "
        f"{r['linear_probe_type_random_init']:.3f} | | {r['mean_cosine_random_init']:.3f} |",
        f"| PCA-50 | {r['knn_type_pca']:.3f} | {r['linear_probe_type_pca']:.3f} | "
        f"{r['knn_batch_pca']:.3f} | |",
        f"| the cell type alone (perfectly integrated) | | | {r['knn_batch_type_only']:.3f} | |",
        f"| chance (largest class) | {r['chance_type']:.3f} | {r['chance_type']:.3f} | "
        f"{r['chance_batch']:.3f} | |",
        "",
        f"Annotation finetuning ({ann['labelled_cells']} labelled cells, {ann['seeds']} seeds, macro-F1 "
        f"mean ± sd): pretrained {ann['pretrained_macro_f1']:.3f} ± {ann['pretrained_macro_f1_sd']:.3f}, "
        f"from scratch {ann['scratch_macro_f1']:.3f} ± {ann['scratch_macro_f1_sd']:.3f}.",
        "",
        f"Time to learning (first evaluation below the per-gene x batch mean): step "
        f"{r['steps_to_learning']}, {_minutes(r['minutes_to_learning'])} into training; training "
        f"{r['train_minutes']:.1f} min, whole command {r['minutes']:.1f} min.",
        "",
        "![learning curve](learning_curve.png)",
        "",
        "![UMAP](umap.png)",
    ]
    (out / "learn.md").write_text("\n".join(lines) + "\n")


def _minutes(m) -> str:
    return "never" if m is None else f"{m:.1f} min"


def format_summary(r: dict) -> str:
    b = r["gep_baselines"]
    ann = r["annotation"]
    return "\n".join(
        [
            "",
            "=== learning benchmark ===",
            f"held-out GEP MSE : {r['gep_mse']:.2f} (init {r['gep_mse_random_init']:.2f}); baselines: per gene "
            f"{b['per_gene_mean']:.2f}, x batch {b['per_gene_batch_mean']:.2f}, x type "
            f"{b.get('per_gene_type_mean', float('nan')):.2f}; gap closed {r['gep_gap_closed']}",
            f"kNN cell type    : X_scGPT {r['knn_type_scgpt']:.3f}  PCA-50 {r['knn_type_pca']:.3f}  "
            f"init {r['knn_type_random_init']:.3f}  (chance {r['chance_type']:.3f})",
            f"linear probe     : X_scGPT {r['linear_probe_type_scgpt']:.3f}  PCA-50 "
            f"{r['linear_probe_type_pca']:.3f}  init {r['linear_probe_type_random_init']:.3f}",
            f"mean cosine      : {r['mean_cosine']:.3f} (init {r['mean_cosine_random_init']:.3f}); batch kNN "
            f"{r['knn_batch_scgpt']:.3f} (PCA {r['knn_batch_pca']:.3f}, type alone "
            f"{r['knn_batch_type_only']:.3f}, chance {r['chance_batch']:.3f})",
            f"annotation F1    : pretrained {ann['pretrained_macro_f1']:.3f} ± {ann['pretrained_macro_f1_sd']:.3f}"
            f"  scratch {ann['scratch_macro_f1']:.3f} ± {ann['scratch_macro_f1_sd']:.3f}",
            f"time to learning : step {r['steps_to_learning']}, {_minutes(r['minutes_to_learning'])}; "
            f"command {r['minutes']:.1f} min",
        ]
    )

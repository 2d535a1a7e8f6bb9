"""The embedded demo: build a local SOMA experiment, pretrain on 2 Ray Train workers with DeepSpeed ZeRO-2,
consolidate, embed the held-out cells and print a summary next to simple baselines.

    python -m jobs.demo [--config jobs/configs/demo.yaml] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_ingest import keys
from data_ingest.datasource import read_token_table
from data_ingest.demo_data import PBMC_DATASET
from data_ingest.source import HOLDOUT, TRAIN, SomaCellSource, open_experiment
from jobs import embed
from jobs._cli import CONFIG_DIR, quiet_ray_data, run_main, setup_logging
from scgpt_dist.config import load_config
from scgpt_dist.evaluate import heldout_gep, knn_accuracy, pca_embedding, with_fixed_masks
from scgpt_dist.inference import EMBEDDING_KEY, embed_anndata
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train.checkpoint import load_consolidated
from scgpt_dist.train.driver import run_pretraining


def export_cells(soma_uri: str, layer: str, joinids, out: Path):
    """Write the given cells of a SOMA experiment to .h5ad (what a user would hand to `jobs.embed`)."""
    import tiledbsoma

    with open_experiment(soma_uri) as exp:
        query = exp.axis_query(
            keys.MEASUREMENT_RNA, obs_query=tiledbsoma.AxisQuery(coords=(joinids,))
        )
        adata = query.to_anndata(X_name=layer)
    adata.var_names = adata.var[keys.VAR_GENE_NAME].astype(str).values
    adata.write_h5ad(out)
    return adata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(Path(CONFIG_DIR) / "demo.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    setup_logging()
    t_start = time.perf_counter()

    import anndata as ad
    import numpy as np
    import ray
    from mlflow.tracking import MlflowClient

    cfg = load_config(args.config, args.overrides)
    quiet_ray_data()
    summary = run_pretraining(cfg)
    ray.shutdown()  # training is done; the rest runs in this process
    out = Path(cfg.output_dir).resolve()
    if "model_dir" not in summary:
        raise RuntimeError("pretraining stopped before max_steps; run the demo again to finish it")

    # Held-out cells -> .h5ad -> jobs.embed, exactly as a user would.
    loaded = load_consolidated(summary["model_dir"])
    source = SomaCellSource(loaded.config.data.source)
    held = source.resolve(loaded.vocab, HOLDOUT)
    heldout_h5ad = out / "heldout.h5ad"
    export_cells(held.soma_uri, held.layer, held.joinids, heldout_h5ad)
    embedded_h5ad = out / "heldout_scgpt.h5ad"
    embed.main(
        [
            "--checkpoint",
            summary["model_dir"],
            "--h5ad",
            str(heldout_h5ad),
            "--out",
            str(embedded_h5ad),
        ]
    )
    adata = ad.read_h5ad(embedded_h5ad)

    # Held-out GEP loss vs the baselines (means from the training cells), on fixed masked positions.
    tok = loaded.config.data.tokenizer
    train_tab = read_token_table(
        source.resolve(loaded.vocab, TRAIN),
        source.resolve(loaded.vocab, TRAIN).joinids,
        tok,
        loaded.vocab.cls_id,
    )
    held_tab = with_fixed_masks(
        read_token_table(held, held.joinids, tok, loaded.vocab.cls_id),
        loaded.config.objectives.mask_ratio,
    )
    gep = heldout_gep(loaded.model, loaded.vocab.pad_id, held_tab, train_tab)

    # kNN cell-type accuracy: X_scGPT vs a 50-PC PCA of the same cells and the same model at initialisation
    # (what pretraining has to beat), per dataset kind.
    import dataclasses

    import torch

    torch.manual_seed(loaded.config.train.seed)  # the run's initial weights
    init = build_model(loaded.config.model, len(loaded.vocab), loaded.vocab.pad_id).eval()
    init_emb = embed_anndata(dataclasses.replace(loaded, model=init), adata)
    knn = {}
    is_pbmc = (adata.obs["dataset_id"] == PBMC_DATASET).to_numpy()
    for name, sel, lognorm in (("pbmc68k_reduced", is_pbmc, False), ("synthetic", ~is_pbmc, True)):
        if sel.sum() < 10:
            continue
        labels = adata.obs["cell_type"].to_numpy()[sel]
        knn[name] = {
            "n_cells": int(sel.sum()),
            "scgpt": knn_accuracy(adata.obsm[EMBEDDING_KEY][sel], labels),
            "pca50": knn_accuracy(pca_embedding(adata.X[sel], 50, log_normalize=lognorm), labels),
            "random_init": knn_accuracy(init_emb[sel], labels),
        }

    client = MlflowClient(summary["tracking_uri"])
    tps = [m.value for m in client.get_metric_history(summary["run_id"], "tokens_per_s")]
    losses = client.get_metric_history(summary["run_id"], "loss")
    final = {
        "heldout_gep_mse": gep["model_mse"],
        "heldout_gep_mse_per_gene_mean_baseline": gep["baselines"]["per_gene_mean"],
        "tokens_per_s": float(np.median(tps)) if tps else float("nan"),
    }
    for name, v in knn.items():
        final[f"knn_acc_{name}_scgpt"] = v["scgpt"]
        final[f"knn_acc_{name}_pca50"] = v["pca50"]
        final[f"knn_acc_{name}_random_init"] = v["random_init"]
    for k, v in final.items():
        client.log_metric(summary["run_id"], k, v)
    wall = time.perf_counter() - t_start
    report = {
        "mlflow": {"tracking_uri": summary["tracking_uri"], "run_id": summary["run_id"]},
        "checkpoint": summary["checkpoint"],
        "model_dir": summary["model_dir"],
        "embeddings": str(embedded_h5ad),
        "steps": summary["step"],
        "final_train_loss": losses[-1].value if losses else None,
        "knn": knn,
        "wall_s": wall,
        **final,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    client.log_artifact(summary["run_id"], str(out / "summary.json"))
    print(_format(report))
    return 0


def _format(r: dict) -> str:
    lines = [
        "",
        "=== scgpt-dist demo summary ===",
        f"MLflow run      : {r['mlflow']['run_id']}  (mlflow ui --backend-store-uri {r['mlflow']['tracking_uri']})",
        f"checkpoint      : {r['checkpoint']}",
        f"consolidated    : {r['model_dir']}",
        f"embeddings      : {r['embeddings']}  (obsm['X_scGPT'])",
        f"steps           : {r['steps']}   throughput: {r['tokens_per_s']:.0f} tokens/s (2 workers)",
        f"final train loss: {r['final_train_loss']:.2f} (GEP + GEPC)",
        f"held-out GEP MSE: {r['heldout_gep_mse']:.2f}   per-gene-mean baseline: "
        f"{r['heldout_gep_mse_per_gene_mean_baseline']:.2f}",
    ]
    for name, v in r["knn"].items():
        lines.append(
            f"kNN accuracy    : {name} ({v['n_cells']} held-out cells): X_scGPT {v['scgpt']:.3f}   "
            f"PCA-50 {v['pca50']:.3f}   same model at init {v['random_init']:.3f}"
        )
    lines.append(f"wall time       : {r['wall_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)

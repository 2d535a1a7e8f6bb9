"""The scale ablation's results: every cell's metrics read back from MLflow, the scaling-law fit and the
report (tables and plots)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_ingest import keys
from data_ingest.source import SomaCellSource, open_experiment
from data_ingest.vocab import GeneVocab
from jobs.scale_ablation.cell import evaluation_cells
from jobs.scale_ablation.config import CELL_METRICS, FIT_METRIC, WHOLE, ScaleAblationConfig
from jobs.scaling_law import fit_scaling_law
from scgpt_dist.config import ExperimentConfig, from_dict
from scgpt_dist.evaluate import knn_accuracy, pca_embedding
from scgpt_dist.tasks.report import Report
from scgpt_dist.train.tracking import PARENT_RUN_TAG

log = logging.getLogger(__name__)


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


TABLE_COLUMNS = tuple(c for c in CELL_METRICS if c != "tokens_seen")


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

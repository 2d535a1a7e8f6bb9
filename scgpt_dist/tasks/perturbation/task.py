"""Perturbation response: finetune scGPT with perturbation flag tokens, predict the mean response of unseen
single perturbations and held-out doubles, next to the no-change, mean-perturbed, linear and additive baselines.

    python -m data_ingest.synth.perturb --out outputs/perturb/perturb.h5ad \\
        --census-truth outputs/synth/census.ground_truth.json
    python -m jobs.finetune perturbation --checkpoint outputs/synth/run/model \\
        --data outputs/perturb/perturb.h5ad --out outputs/perturb/run

The data: counts (or log-normalized values) with obs `perturbation` in GEARS naming (`ctrl`, `A+ctrl`,
`A+B`). Without --checkpoint only the baselines run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from data_ingest import keys
from scgpt_dist.preprocess import log_normalize
from scgpt_dist.tasks.config import TaskConfig, arg
from scgpt_dist.tasks.perturbation import method as pt
from scgpt_dist.tasks.runner import TaskContext, load_cells
from scgpt_dist.train.checkpoint import load_consolidated

DESCRIPTION = (
    "perturbation response: flag-token finetuning vs no-change, mean, linear and additive baselines"
)
METRICS = ("pearson_delta", "pearson_delta_de20", "mse", "mse_de20")


@dataclass
class PerturbationConfig(TaskConfig):
    """Perturbation-response settings (besides the common ones)."""

    perturbation_key: str = arg("perturbation", "obs column with GEARS-style names")
    unseen_fraction: float = arg(0.25, "share of singles held out (unseen)")
    double_test_fraction: float = arg(
        0.5, "share of the doubles made of training singles that are held out"
    )
    n_genes: int | None = arg(
        None, "context genes (default: the model's max_seq_len - 1, or 255 without a model)"
    )
    epochs: int = arg(5)
    lr: float = arg(1e-4, "AdamW learning rate (reference: 1e-4)")
    batch_size: int = arg(32)
    pred_controls: int = arg(300, "control cells averaged per prediction")
    scratch: bool = arg(False, "also train a from-scratch model (same recipe)")
    pca_components: int = arg(10, "linear baseline's PCs")


def _batch_index(loaded, adata) -> int:
    """The pretrained batch id of the cells' dataset, when the checkpoint recorded its categories."""
    cats = (loaded.meta.get("data") or {}).get("batch_categories") or []
    if keys.OBS_DATASET in adata.obs and cats:
        ds = str(adata.obs[keys.OBS_DATASET].iloc[0])
        if ds in cats:
            return cats.index(ds)
    return 0


def run(cfg: PerturbationConfig, ctx: TaskContext) -> dict:

    t_start = time.perf_counter()
    if cfg.max_cells:
        raise ValueError(
            "--max-cells would subsample control and perturbed cells unevenly; the perturbation task "
            "uses every cell (make a smaller screen with `python -m data_ingest.synth.perturb` instead)"
        )
    adata = load_cells(cfg.data, cfg.obs_filter, None, cfg.seed)
    if cfg.perturbation_key not in adata.obs:
        raise ValueError(
            f"--perturbation-key {cfg.perturbation_key!r} is not an obs column; have "
            f"{list(adata.obs)} (write the data with `python -m data_ingest.synth.perturb`)"
        )
    labels = adata.obs[cfg.perturbation_key].astype(str).to_numpy()
    names = sorted(set(labels) - {keys.CONTROL_CONDITION})
    split = pt.split_perturbations(names, cfg.unseen_fraction, cfg.double_test_fraction, cfg.seed)
    groups = split.groups()
    test = sorted({n for g in groups.values() for n in g})

    loaded = None
    if cfg.checkpoint:
        loaded = load_consolidated(cfg.checkpoint)
    n_genes = cfg.n_genes or (
        loaded.config.data.tokenizer.max_seq_len - 1 if loaded is not None else 255
    )
    allowed = set(loaded.vocab.to_dict()) if loaded is not None else None
    data = pt.build_response_data(
        log_normalize(adata.X),
        list(adata.var_names.astype(str)),
        labels,
        split.train,
        n_genes,
        allowed,
    )
    ctx.report.text(
        f"{adata.n_obs} cells: {len(data.ctrl)} control, {len(names)} perturbations "
        f"({sum(pt.is_double(n) for n in names)} doubles). Context: {len(data.genes)} genes (every "
        "target gene, then the highest mean log expression over control + training cells). Split (seed "
        f"{cfg.seed}): {len(split.train)} training perturbations, "
        + ", ".join(f"{len(v)} {k}" for k, v in groups.items())
        + ". Values: log1p(counts normalized to 1e4); the model's input is the control cell's bins, its "
        "target the perturbed cell's log1p values. Pearson delta: correlation over genes of predicted vs "
        "true (mean - control mean); de20: the 20 genes with the largest |Welch t| of the perturbation vs "
        "control. The no-change baseline predicts no change, so it has no Pearson delta (n/a)."
    )

    # --- predictions: name -> {method: (G,) predicted mean}
    preds: dict[str, dict[str, np.ndarray]] = {}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    preds["no_change"] = pt.baseline_no_change(data, test)
    preds["mean_perturbed"] = pt.baseline_mean_perturbed(data, split.train, test)
    preds["linear_pca"] = pt.baseline_linear(
        data, split.train, test, pt.pca_gene_features(data, split.train, cfg.pca_components)
    )
    if loaded is not None:
        preds["linear_scgpt_emb"] = pt.baseline_linear(
            data, split.train, test, pt.pretrained_gene_embeddings(loaded, data.genes)
        )
    preds["additive"] = pt.baseline_additive(data, split.train, test)
    timings["baselines_s"] = time.perf_counter() - t0

    losses: dict[str, list[float]] = {}
    if loaded is not None:
        arms = [("scgpt", False)] + ([("scgpt_scratch", True)] if cfg.scratch else [])
        for method, scratch in arms:
            t0 = time.perf_counter()
            predictor = pt.PerturbationPredictor(
                loaded, data, _batch_index(loaded, adata), from_scratch=scratch, seed=cfg.seed
            )
            train_cfg = pt.PerturbationTrainConfig(
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                n_pred_controls=cfg.pred_controls,
                seed=cfg.seed,
            )
            losses[method] = predictor.fit(split.train, train_cfg)
            preds[method] = predictor.predict_means(test, cfg.pred_controls, seed=cfg.seed)
            timings[f"{method}_s"] = time.perf_counter() - t0

    # --- metrics per perturbation, then averaged per (group, method)
    ctrl_mean = data.ctrl_mean
    de = {n: pt.de_genes(data.ctrl, data.cells[n]) for n in test}
    per_pert = {
        (method, n): pt.response_metrics(p[n], data.mean(n), ctrl_mean, de[n])
        for method, p in preds.items()
        for n in test
        if n in p
    }
    rows, metrics = [], {}
    for group, members in groups.items():
        for method, p in preds.items():
            have = [n for n in members if n in p]
            if not have:
                continue
            row = {"group": group, "method": method, "n": len(have)}
            for m in METRICS:
                vals = np.array([per_pert[(method, n)][m] for n in have], dtype=float)
                row[m] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
                metrics[f"{group}.{method}.{m}"] = row[m]
            rows.append(row)
    ctx.report.table("Mean over test perturbations", rows)
    _verdicts(ctx, rows)
    for method, curve in losses.items():
        metrics[f"train.{method}.final_mse"] = curve[-1] if curve else float("nan")
        ctx.report.text(f"{method} training MSE per epoch: " + ", ".join(f"{x:.4f}" for x in curve))
    _planted_truth(ctx, adata, data, test, preds)
    _scatter(ctx, data, groups, preds)
    per_rows = [
        {"perturbation": n, "method": method, **{m: v for m, v in per_pert[(method, n)].items()}}
        for n in test
        for method in preds
        if (method, n) in per_pert
    ]
    ctx.report.results["per_perturbation"] = per_rows
    ctx.report.results["split"] = {
        "train": split.train,
        **groups,
    }
    metrics.update({k: float(v) for k, v in timings.items()})
    metrics["n_train_perturbations"] = float(len(split.train))
    metrics["n_context_genes"] = float(len(data.genes))
    metrics["wall_s"] = time.perf_counter() - t_start
    (ctx.out_dir / "per_perturbation.json").write_text(json.dumps(per_rows, indent=1))
    np.savez_compressed(
        ctx.out_dir / "predicted_means.npz",
        genes=np.asarray(data.genes),
        control_mean=ctrl_mean,
        **{f"true/{n}": data.mean(n) for n in test},
        **{f"{method}/{n}": v for method, p in preds.items() for n, v in p.items()},
    )
    return metrics


def _verdicts(ctx, rows: list[dict]) -> None:
    """Say plainly, per test group, whether the finetuned model beats the best baseline."""
    lines = []
    for group in dict.fromkeys(r["group"] for r in rows):
        g = {r["method"]: r for r in rows if r["group"] == group}
        if "scgpt" not in g:
            continue
        base = {k: v for k, v in g.items() if not k.startswith("scgpt")}
        best = max(
            base,
            key=lambda k: (
                -np.inf if np.isnan(base[k]["pearson_delta"]) else base[k]["pearson_delta"]
            ),
        )
        ours = g["scgpt"]["pearson_delta"]
        verdict = "beats" if ours > base[best]["pearson_delta"] else "does NOT beat"
        lines.append(
            f"- {group}: scGPT Pearson delta {ours:.3f} {verdict} the best baseline "
            f"({best}, {base[best]['pearson_delta']:.3f}); MSE {g['scgpt']['mse']:.4f} vs "
            f"{base[best]['mse']:.4f}."
        )
    if lines:
        ctx.report.text("**Verdict** (Pearson delta on all context genes):\n" + "\n".join(lines))


def _planted_truth(ctx, adata, data, test, preds) -> None:
    """With a synthetic screen: how well each method's change matches the planted expected log fold change."""
    if keys.UNS_EXPECTED_LFC not in adata.uns:
        return
    index = list(adata.uns[keys.UNS_EXPECTED_LFC_INDEX])
    lfc = np.asarray(adata.uns[keys.UNS_EXPECTED_LFC])  # (n_perts, all genes)
    cols = [list(adata.var_names).index(g) for g in data.genes]
    rows = []
    for method, p in [("observed", {n: data.mean(n) for n in test}), *preds.items()]:
        vals = []
        for n in test:
            if n in p and n in index:
                d = p[n] - data.ctrl_mean
                e = lfc[index.index(n), cols]
                if np.std(d) > 1e-9 and np.std(e) > 1e-9:
                    vals.append(float(np.corrcoef(d, e)[0, 1]))
        if vals:
            rows.append({"method": method, "n": len(vals), "pearson_vs_planted_lfc": np.mean(vals)})
    ctx.report.table("Correlation of the predicted change with the planted log fold change", rows)


COLORS = {
    "scgpt": "tab:blue",
    "scgpt_scratch": "tab:cyan",
    "additive": "tab:red",
    "linear_pca": "tab:orange",
    "linear_scgpt_emb": "tab:purple",
    "mean_perturbed": "tab:green",
}


def _scatter(ctx, data, groups: dict[str, list[str]], preds) -> None:
    """Predicted vs true change from control for a few test perturbations (one color per method)."""
    picks = [(g, n) for g, members in groups.items() for n in members[:2]][:4]
    if not picks:
        return
    methods = [m for m in ("scgpt", "additive", "linear_pca", "mean_perturbed") if m in preds]
    fig = ctx.report.figure("delta_scatter", width=4.0 * len(picks), height=4.4)
    true_ctrl = data.ctrl_mean
    handles = {}
    for i, (group, n) in enumerate(picks):
        ax = fig.add_subplot(1, len(picks), i + 1)
        true = data.mean(n) - true_ctrl
        for m in methods:
            if n in preds[m]:
                handles[m] = ax.scatter(
                    true, preds[m][n] - true_ctrl, s=6, alpha=0.6, color=COLORS[m], label=m
                )
        lim = float(np.abs(true).max()) * 1.1 or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        ax.set_title(f"{n}\n({group})", fontsize=9)
        ax.set_xlabel("true mean change (log1p)")
        if i == 0:
            ax.set_ylabel("predicted mean change")
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles))
    fig.subplots_adjust(top=0.8)

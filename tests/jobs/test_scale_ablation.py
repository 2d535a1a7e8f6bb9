"""jobs.scale_ablation: grid expansion, one real tiny cell (Ray task -> Ray Train pretraining -> evaluation ->
MLflow child run), and collection + fit + report on stored MLflow runs made from a known scaling law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from jobs.scale_ablation.cell import cell_steps, train_holdout_fraction
from jobs.scale_ablation.config import FIT_METRIC, WHOLE, ScaleAblationConfig, load_ablation_config
from jobs.scale_ablation.job import grid_cells, run_ablation
from jobs.scale_ablation.report import collect_results, write_ablation_report
from jobs.sweep import expand_cells
from scgpt_dist.config import ConfigError, from_dict
from tests.conftest import REPO, TINY_CONFIG

CPU_PRESET = REPO / "jobs" / "configs" / "scale_ablation_cpu.yaml"


def test_cpu_preset_grid_has_sizes_x_data_plus_the_context_arm():
    cfg = load_ablation_config(CPU_PRESET)
    cells = grid_cells(cfg)
    whole = [c for c in cells if c["tissue"] == WHOLE]
    assert len(whole) == len(cfg.models) * len(cfg.n_cells) == 9
    organ = [c for c in cells if c["tissue"] == cfg.context.tissue]
    assert len(organ) == 1 and organ[0]["n_cells"] == 3000
    # The organ cell's whole-census twin is the grid cell of the same model and D: run once.
    assert len(cells) == 10
    from jobs.scale_ablation.job import sweep_config

    assert len(expand_cells(sweep_config(cfg))) == 10
    # One epoch-based step count per D (3 epochs, global batch 16 x 2 workers).
    assert [cell_steps(vars(cfg.steps), d, 32) for d in cfg.n_cells] == [94, 282, 844]


def test_cluster_preset_loads():
    cfg = load_ablation_config(REPO / "jobs" / "configs" / "scale_ablation_cluster.yaml")
    assert len(grid_cells(cfg)) >= 9 and cfg.base["train"]["use_gpu"]


def test_training_subsets_nest_and_exclude_the_evaluation_cells():
    from data_ingest.source import holdout_mask

    ids = np.arange(20000)
    evaluation = holdout_mask(ids, 0.1, 0)
    trains = []
    for d in (1000, 3000, 9000):
        train = ~holdout_mask(ids, train_holdout_fraction(20000, d, 0.1, "x"), 0)
        assert abs(train.sum() - d) < 4 * math.sqrt(d) and not (train & evaluation).any()
        trains.append(train)
    assert not (trains[0] & ~trains[1]).any() and not (trains[1] & ~trains[2]).any()
    with pytest.raises(ValueError, match="lower n_cells or use a bigger source"):
        train_holdout_fraction(20000, 19000, 0.1, "the source")


def test_bad_ablation_configs_say_what_to_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    base = "base: {}\nmodels: [{name: a}]\nn_cells: [10]\n"
    bad.write_text(base + "context: {tissue: liver, n_cells: [5], models: [b]}\n")
    with pytest.raises(ConfigError, match="not in models"):
        load_ablation_config(bad)
    bad.write_text("base: {train: {lrr: 1}}\nmodels: [{name: a}]\nn_cells: [10]\n")
    with pytest.raises(ConfigError, match="did you mean 'base.train.lr'"):
        load_ablation_config(bad)
    bad.write_text(base + "steps: {epochs: 1, fixed: 5}\n")
    with pytest.raises(ConfigError, match="exactly one of steps.epochs and steps.fixed"):
        load_ablation_config(bad)


@pytest.mark.slow
def test_one_real_cell_pretrains_evaluates_and_logs_a_child_run(ray_local, demo_soma, tmp_path):
    from mlflow.tracking import MlflowClient

    base = yaml.safe_load(TINY_CONFIG.read_text())
    base.pop("name"), base.pop("output_dir")
    base["data"]["source"]["soma_uri"] = str(demo_soma)
    base["data"]["build_demo"] = False
    base["model"]["use_batch_labels"] = False
    base["mlflow"] = {"system_metrics": False}
    cfg = from_dict(
        ScaleAblationConfig,
        {
            "name": "tiny-ablation",
            "output_dir": str(tmp_path / "abl"),
            "base": base,
            "models": [{"name": "xs", "d_model": 16, "n_layers": 1, "n_heads": 2, "d_hid": 32}],
            "n_cells": [200],
            "steps": {"epochs": None, "fixed": 4, "min_steps": 1},
            "eval": {"holdout_fraction": 0.2, "max_cells": 120, "knn_k": 5, "baseline_cells": 200},
            "fit": {"bootstrap": 0},
            "finetune": {
                "task": "zeroshot",
                "args": [
                    "--data",
                    "pbmc68k_reduced",
                    "--max-cells",
                    "100",
                    "--no-scvi",
                    "--no-umap",
                ],
            },
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        },
    )
    result = run_ablation(cfg)
    assert result["failed"] == {} and len(result["ran"]) == 1
    (row,) = result["rows"]
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(row["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
    assert run.data.params["model.d_model"] == "16" and run.data.params["train.max_steps"] == "4"
    # N: the non-embedding parameters of the trained model; D: its training cells (~200 by the hash split).
    from scgpt_dist.train.checkpoint import load_consolidated

    model = load_consolidated(tmp_path / "abl" / "cells" / result["ran"][0] / "run" / "model").model
    assert (
        row["n_params"]
        == model.num_params(embeddings=False)
        < sum(p.numel() for p in model.parameters())
    )
    assert 150 <= row["n_train_cells"] <= 250 and row["steps"] == 4
    assert row["compute_flops"] == pytest.approx(6 * row["n_params"] * row["tokens_seen"])
    assert (
        row["n_eval_cells"] == 120 and 0 < row[FIT_METRIC] and 0 < row["heldout_gep_mse_baseline"]
    )
    assert 0 <= row["knn_acc"] <= 1
    # The optional downstream task ran on the cell's model; its metrics joined the cell's run.
    assert 0 <= row["ft_scgpt_zeroshot/knn_accuracy"] <= 1
    assert (
        row["ft_scgpt_zeroshot/knn_accuracy"] == run.data.metrics["ft_scgpt_zeroshot/knn_accuracy"]
    )
    # One size, one D: the report says why there is no fit instead of inventing one.
    assert result["fit"] is None and "No scaling-law fit" in open(result["report"]).read()

    again = run_ablation(cfg, report_only=True)
    assert again["ran"] == [] and again["reused"] == result["ran"]
    assert again["rows"][0]["run_id"] == row["run_id"]


TRUE = {"E": 60.0, "A": 2000.0, "alpha": 0.4, "B": 900.0, "beta": 0.35}


def test_collection_fit_and_report_from_stored_mlflow_runs(tmp_path):
    """Child runs logged the way cells log them, with losses from a known law (1% noise): collected from
    MLflow, fitted (true parameters inside the CIs), plotted and tabulated."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from scgpt_dist.train.tracking import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "abl", uri, tmp_path)
    parent = client.create_run(exp).info.run_id
    rng = np.random.default_rng(0)
    sizes = {"xs": 2e3, "s": 1e4, "m": 5e4, "l": 2.5e5}
    cells = [(m, d, WHOLE) for m in sizes for d in (500, 2000, 8000, 32000)] + [
        ("m", 2000, "liver")
    ]
    for model, d, tissue in cells:
        n = sizes[model]
        loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
        tags = {"ablation.model": model, "ablation.n_cells": str(d), "ablation.tissue": tissue}
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, **tags}).info.run_id
        metrics = {
            "n_params": n,
            "n_train_cells": d,
            "tokens_seen": 100.0 * d,
            "compute_flops": 6 * n * 100.0 * d,
            FIT_METRIC: loss * math.exp(rng.normal(0, 0.01)),
            "knn_acc": 1 - 0.5 / math.log(d),
            "heldout_gep_mse_tissue": loss,
            "knn_acc_tissue": 0.5,
        }
        client.log_batch(run, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])
    client.create_run(exp, tags={"mlflow.parentRunId": parent})  # an unfinished cell: skipped

    rows = collect_results(uri, parent)
    assert len(rows) == len(cells) and rows[-1]["tissue"] == "liver"
    cfg = from_dict(
        ScaleAblationConfig,
        {
            "models": [{"name": m} for m in sizes],
            "n_cells": [500, 2000, 8000, 32000],
            "context": {"tissue": "liver", "n_cells": [2000], "models": ["m"]},
            "fit": {"bootstrap": 40},
        },
    )
    path, fit = write_ablation_report(cfg, rows, tmp_path / "report")
    for k in TRUE:
        lo, hi = fit.ci[k]
        assert lo <= TRUE[k] <= hi, f"{k}: {TRUE[k]} outside ({lo:.4g}, {hi:.4g})"
    assert fit.n_points == 16
    text = path.read_text()
    assert (
        "falls with N at every D: **True**" in text and "falls with D at every N: **True**" in text
    )
    assert "Context arm: liver-only vs whole-census" in text and "degenerate" not in text
    for png in ("loss_vs_compute.png", "knn_acc_vs_cells.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000

"""`python -m jobs.finetune grn` end to end as a Ray task on a tiny synthetic census: metrics against the planted
network, the report (tables, PNGs, results.json), the MLflow run, and bad input."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from jobs.finetune.__main__ import main
from scgpt_dist.tasks.grn import metrics as gm
from scgpt_dist.tasks.runner import load_cells
from tests.scgpt_dist.tasks.grn.test_method import write_tiny_census, write_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grn_job")
    census = write_tiny_census(root / "census")
    truth = gm.PlantedNetwork.load(gm.find_truth(census))
    genes = list(load_cells(str(census)).var_names)
    # A model whose gene embeddings hold the planted modules, so the scGPT rows have something to find.
    model = write_tiny_model(root / "model", genes, truth.modules)
    # One MLflow store for the module: creating a sqlite store runs its migrations (seconds).
    return {
        "root": root,
        "census": census,
        "model": model,
        "tracking": f"sqlite:///{root / 'm.db'}",
    }


def test_grn_task_scores_against_the_planted_network(setup, ray_local, tmp_path):
    out = tmp_path / "grn_ray"
    argv = ["grn", "--checkpoint", str(setup["model"]), "--data", str(setup["census"])]
    argv += ["--out", str(out), "--tracking-uri", setup["tracking"], "--cell-type", "celltype_000"]
    argv += ["--attention-cells", "40", "--attention-passes", "1", "--top-edges", "5"]
    assert main(argv) == 0  # a Ray task on the session's local Ray; truth found next to the census

    results = json.loads((out / "report" / "results.json").read_text())
    m = results["metrics"]
    # The planted-embedding model's gene network recovers all modules; the correlation baseline recovers the
    # modules active in the chosen cell type. Random AUPRC is the edge density.
    assert m["scgpt_embedding_all_auprc"] > 0.9 and m["scgpt_embedding_all_program_ari"] > 0.9
    assert m["pearson_celltype_active_auprc_ratio"] > 100
    assert m["random_all_auprc"] == pytest.approx(
        m["n_edges_all"] / (m["n_genes"] * (m["n_genes"] - 1) / 2)
    )
    assert 0 < m["attention_pair_coverage"] <= 1 and m["n_cells_attention"] == 40
    for key in ("scgpt_attention_all_auprc", "scgpt_attention_active_early_precision"):
        assert 0.0 <= m[key] <= 1.0

    tables = results["tables"]
    summary = tables["Edge recovery and gene programs vs the planted network"]
    assert len(summary) == 10  # 4 methods + the null control, x 2 truth sets
    assert m["expression_null_active_auprc_ratio"] < m["pearson_celltype_active_auprc_ratio"] / 10
    assert {r["method"] for r in summary} >= {"scGPT attention", "Pearson, all cells (baseline)"}
    top = next(rows for title, rows in tables.items() if title.startswith("Top edges"))
    assert len(top) == 3 * 5 and {r["planted"] for r in top} <= {"yes", "no"}

    report = (out / "report" / "report.md").read_text()
    assert "AUPRC / random" in report and "celltype_000" in report
    assert "beats" in report or "loses to" in report
    for png in ("grn_pr_curves.png", "grn_heatmaps.png"):
        assert (out / "report" / png).stat().st_size > 10_000

    client = MlflowClient(setup["tracking"])
    exp = client.get_experiment_by_name("scgpt-dist-finetune")
    (run,) = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'grn-grn_ray'")
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "grn"
    assert run.data.metrics["scgpt_embedding_all_auprc"] == pytest.approx(
        m["scgpt_embedding_all_auprc"]
    )


def test_grn_task_without_a_model_runs_the_baselines(setup, tmp_path):
    out = tmp_path / "out"
    argv = ["grn", "--data", str(setup["census"]), "--out", str(out), "--in-process"]
    argv += ["--tracking-uri", setup["tracking"]]
    assert main(argv) == 0
    m = json.loads((out / "report" / "results.json").read_text())["metrics"]
    assert "scgpt_embedding_all_auprc" not in m and m["pearson_allcells_all_auprc_ratio"] > 10


def test_grn_task_bad_input(setup, tmp_path):
    base = [
        "grn",
        "--checkpoint",
        str(setup["model"]),
        "--out",
        str(tmp_path / "o"),
        "--in-process",
    ]
    base += ["--tracking-uri", setup["tracking"]]
    with pytest.raises(ValueError, match="--cell-type 'nope' is not in the data"):
        main(base + ["--data", str(setup["census"]), "--cell-type", "nope"])
    with pytest.raises(FileNotFoundError, match="--truth"):
        main(base + ["--data", str(setup["census"]), "--truth", str(tmp_path / "missing.json")])
    h5ad = tmp_path / "cells.h5ad"
    load_cells(str(setup["census"]))[:50].copy().write_h5ad(h5ad)
    with pytest.raises(FileNotFoundError, match="ground_truth.json"):
        main(base + ["--data", str(h5ad)])

"""`python -m jobs.finetune perturbation` end to end on a small synthetic screen and a tiny model: report with
table and scatter PNG, finite metrics in MLflow, and the planted structure visible in the baselines."""

from __future__ import annotations

import json
import math

import pytest

from data_ingest import keys
from data_ingest.synth.perturb import write_h5ad_atomic
from tests.scgpt_dist.tasks.perturbation.test_method import small_screen, tiny_model_dir


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from jobs.finetune.__main__ import main
    from scgpt_dist.tasks.perturbation import method as pt

    root = tmp_path_factory.mktemp("perturb")
    screen = small_screen()
    data_path = write_h5ad_atomic(screen, root / "screen.h5ad")
    # The tiny model's vocabulary: the screen's genes (all 400), context 47 genes.
    model = tiny_model_dir(root / "model", list(screen.var_names), max_seq_len=48)
    out = root / "run"
    argv = ["perturbation", "--checkpoint", str(model), "--data", str(data_path), "--out", str(out)]
    argv += ["--in-process", "--threads", "1", "--epochs", "4", "--lr", "3e-3", "--pred-controls"]
    argv += ["100", "--unseen-fraction", "0.3", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    assert main(argv) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    return {"out": out, "root": root, "results": results, "pt": pt}


def test_report_written(job):
    report = job["out"] / "report"
    text = (report / "report.md").read_text()
    assert "Mean over test perturbations" in text and "delta_scatter.png" in text
    assert (report / "delta_scatter.png").stat().st_size > 10_000
    assert "Verdict" in text and "planted log fold change" in text
    rows = job["results"]["tables"]["Mean over test perturbations"]
    methods = {r["method"] for r in rows}
    expected = {
        "no_change",
        "mean_perturbed",
        "linear_pca",
        "linear_scgpt_emb",
        "additive",
        "scgpt",
    }
    assert methods == expected
    assert {r["group"] for r in rows} >= {"unseen_single", "double_seen"}


def test_metrics_finite_and_logged(job):
    m = job["results"]["metrics"]
    for group in ("unseen_single", "double_seen"):
        for metric in ("pearson_delta", "pearson_delta_de20", "mse", "mse_de20"):
            assert math.isfinite(m[f"{group}.scgpt.{metric}"]), (group, metric)
        assert math.isnan(m[f"{group}.no_change.pearson_delta"])  # no change has no correlation
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{job['root'] / 'mlflow.db'}")
    run = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.task = 'perturbation'"
    )[0]
    assert run.info.status == "FINISHED"
    assert math.isclose(
        run.data.metrics["double_seen.scgpt.mse"], m["double_seen.scgpt.mse"], rel_tol=1e-6
    )


def test_planted_structure_shows_in_the_baselines(job):
    """Doubles with planted single effects: the additive model beats predicting no change, and every
    method that uses the training responses correlates with the true change."""
    m = job["results"]["metrics"]
    assert m["double_seen.additive.mse"] < m["double_seen.no_change.mse"]
    assert m["double_seen.additive.pearson_delta"] > 0.5
    for method in ("mean_perturbed", "linear_pca", "linear_scgpt_emb"):
        assert m[f"unseen_single.{method}.pearson_delta"] > 0.1, method
        assert m[f"unseen_single.{method}.mse_de20"] < m["unseen_single.no_change.mse_de20"], method
    # The tiny model after 4 epochs: its change points the right way (it is not asked to beat anything).
    assert m["unseen_single.scgpt.pearson_delta"] > 0.1
    planted = job["results"]["tables"][
        "Correlation of the predicted change with the planted log fold change"
    ]
    observed = next(r for r in planted if r["method"] == "observed")
    assert observed["pearson_vs_planted_lfc"] > 0.9  # the screen's changes are the planted ones
    split = job["results"]["split"]
    trained = {g for n in split["train"] for g in job["pt"].targets_of(n)}
    for n in split["unseen_single"]:
        assert not set(job["pt"].targets_of(n)) & trained


def test_bad_input_errors(tmp_path):
    from scgpt_dist.tasks import perturbation
    from scgpt_dist.tasks.report import Report
    from scgpt_dist.tasks.runner import TaskContext

    screen = small_screen()
    del screen.obs[keys.OBS_PERTURBATION]
    path = write_h5ad_atomic(screen, tmp_path / "x.h5ad")
    args = perturbation.Config(data=str(path), out=str(tmp_path))
    ctx = TaskContext(out_dir=tmp_path, report=Report("x", tmp_path / "report"))
    with pytest.raises(ValueError, match="perturbation-key"):
        perturbation.run(args, ctx)
    args.max_cells = 100
    with pytest.raises(ValueError, match="max-cells"):
        perturbation.run(args, ctx)

"""`python -m jobs.finetune annotation` and `zeroshot` on the tiny pretrained model: real finetuning, baselines,
the report and the MLflow run."""

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from jobs.finetune.__main__ import main as finetune_main
from scgpt_dist.tasks.annotation.method import classification_metrics, split_cells

SYNTH = "value_kind == 'counts'"


def _results(out):
    return json.loads((out / "report" / "results.json").read_text())


def test_split_by_dataset_drops_unseen_query_types():
    obs = pd.DataFrame(
        {
            "cell_type": ["a", "a", "b", "b", "c", "a"],
            "dataset_id": ["d1", "d1", "d1", "d2", "d2", "d2"],
        }
    )
    split = split_cells(obs, "cell_type", "dataset_id", ["d2"])
    assert split.reference.tolist() == [0, 1, 2]
    assert split.query.tolist() == [3, 5]  # the "c" cell has no reference example
    assert "1 query cells" in split.how
    with pytest.raises(ValueError, match="must both be non-empty"):
        split_cells(obs, "cell_type", "dataset_id", ["d9"])


def test_classification_metrics_macro_averages():
    m = classification_metrics(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]))
    assert m["accuracy"] == 0.75
    assert m["macro_recall"] == pytest.approx(0.5)  # class 1 never found


@pytest.mark.slow
def test_annotation_end_to_end_as_ray_task(pretrained, demo_soma, ray_local, tmp_path):
    out = tmp_path / "annot"
    args = [
        "annotation",
        "--checkpoint", str(pretrained["second"]["model_dir"]),
        "--data", str(demo_soma),
        "--obs-filter", SYNTH,
        "--query-key", "dataset_id",
        "--query-values", "synthetic_batch_2",
        "--epochs", "4",
        "--lr", "5e-3",
        "--n-hvg", "300",
        "--out", str(out),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    assert finetune_main(args) == 0
    rows = {
        r["method"]: r for r in _results(out)["tables"]["Query-set annotation (sorted by macro F1)"]
    }
    assert set(rows) == {"scgpt_finetuned", "scgpt_scratch", "logreg_l1_hvg", "logreg_pca50"}
    for r in rows.values():
        for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
    # Six planted cell types with strong markers: the L1 baseline is far above chance (1/6).
    assert rows["logreg_l1_hvg"]["accuracy"] > 0.8
    report = (out / "report" / "report.md").read_text()
    assert "confusion.png" in report and (out / "report" / "confusion.png").stat().st_size > 1000
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("scgpt-dist-finetune").experiment_id]
    )
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "annotation"
    cls = [m.value for m in client.get_metric_history(run.info.run_id, "scgpt_finetuned/cls")]
    assert len(cls) == 4 and cls[-1] < cls[0]  # the CLS loss fell over the epochs
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {
        "report/report.md",
        "report/confusion.png",
    }


@pytest.mark.slow
def test_zeroshot_scores_embeddings_and_baselines(pretrained, demo_soma, tmp_path):
    out = tmp_path / "zs"
    args = [
        "zeroshot", "--in-process",
        "--checkpoint", str(pretrained["second"]["model_dir"]),
        "--data", str(demo_soma),
        "--obs-filter", SYNTH,
        "--no-scvi", "--no-umap",
        "--out", str(out),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    assert finetune_main(args) == 0
    (table,) = _results(out)["tables"].values()
    rows = {r["method"]: r for r in table}
    assert set(rows) == {"hvg_pca50", "scgpt_zeroshot"}
    for r in rows.values():
        for key in ("knn_accuracy", "nmi", "asw_batch", "graph_conn", "overall"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert -1.0 <= r["ari"] <= 1.0  # adjusted for chance: slightly negative when random
    assert rows["hvg_pca50"]["knn_accuracy"] > 0.8  # planted types are easy for PCA
    # Sorted by the scib overall score, best first.
    assert table[0]["overall"] >= table[1]["overall"]


def test_bad_label_key_is_a_clear_error(pretrained, tmp_path, capsys):
    with pytest.raises(ValueError, match="--label-key 'nope' is not an obs column"):
        finetune_main(
            ["annotation", "--in-process", "--data", "pbmc68k_reduced", "--label-key", "nope",
             "--out", str(tmp_path / "x"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
        )  # fmt: skip

"""The learning test: a tiny pretraining through the real pipeline (Ray Train, 2 workers, DeepSpeed ZeRO-2,
MLflow) on a small planted census must use context and put cell types into its embedding, so learning can
never silently regress. Runs `python -m jobs.bench learn` end to end (about 2 minutes on 2 cores)."""

import json

import anndata as ad
import pytest
from mlflow.tracking import MlflowClient

from data_ingest.synth.census import CensusSynthConfig, experiment_uri, write_synthetic_census
from jobs.bench import learn
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` skips it

TINY_LEARN = REPO / "jobs" / "configs" / "learn_tiny.yaml"


@pytest.fixture(scope="module")
def planted_census(tmp_path_factory):
    cfg = CensusSynthConfig(
        n_cells=3000,
        n_genes=400,
        n_datasets=4,
        n_tissues=1,
        n_cell_types=6,
        types_per_tissue=6,
        n_modules=8,
        genes_per_module=10,
        non_primary_fraction=0.0,
        mean_library_size=1500.0,
        seed=3,
    )
    uri = write_synthetic_census(tmp_path_factory.mktemp("census") / "c", cfg, progress=False)
    return experiment_uri(uri, cfg.organism)


@pytest.fixture(scope="module")
def learned(ray_local, planted_census, tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    argv = [
        "--soma-uri", planted_census, "--label-key", "cell_type", "--batch-key", "dataset_id",
        "--out", str(out), "--config", str(TINY_LEARN), "--eval-cells", "400",
        "--finetune-cells", "100", "--finetune-epochs", "3", "--seeds", "1",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
    ]  # fmt: skip
    assert learn.main(argv) == 0
    return out, json.loads((out / "learn.json").read_text())


def test_pretraining_uses_context_and_learns_cell_types(learned):
    _, r = learned
    base = r["gep_baselines"]
    # Held-out masked values: better than any context-free guess that knows the gene and its batch.
    assert r["gep_mse"] < 0.9 * base["per_gene_batch_mean"]
    assert r["gep_mse"] < r["gep_mse_random_init"]
    # The cell embedding knows the planted types, far beyond the same model at initialisation.
    assert r["knn_type_scgpt"] > r["knn_type_random_init"] + 0.25
    assert r["knn_type_scgpt"] > 0.8
    assert r["steps_to_learning"] is not None and r["steps_to_learning"] <= r["steps"]


def test_outputs_a_user_can_open(learned):
    out, r = learned
    for key in (
        "knn_type_scgpt", "knn_type_pca", "knn_type_random_init", "mean_cosine", "gep_mse",
        "gep_baselines", "annotation", "minutes", "linear_probe_type_scgpt", "knn_batch_scgpt",
        "knn_batch_type_only",
    ):  # fmt: skip
        assert key in r
    assert set(r["gep_baselines"]) == {"per_gene_mean", "per_gene_batch_mean", "per_gene_type_mean"}
    assert {"pretrained_macro_f1", "scratch_macro_f1", "seeds"} <= set(r["annotation"])
    adata = ad.read_h5ad(out / "heldout.h5ad")
    assert adata.n_obs == r["heldout_cells_scored"] and adata.obsm["X_scGPT"].shape[1] == 32
    assert {"cell_type", "dataset_id"} <= set(adata.obs.columns)
    assert (adata.X.data == adata.X.data.round()).all()  # raw counts, as read from the experiment
    report = (out / "learn.md").read_text()
    assert "learning_curve.png" in report and "umap.png" in report
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / "umap.png").stat().st_size > 0
    # The in-training evaluation is in the run: step 0 (the model at init) up to the last step.
    client = MlflowClient(r["mlflow"]["tracking_uri"])
    steps = [m.step for m in client.get_metric_history(r["mlflow"]["run_id"], "eval/gep_mse")]
    assert steps[0] == 0 and steps[-1] == r["steps"] and len(steps) >= 5


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="--soma-uri .* does not exist"):
        learn.parse_args(["--soma-uri", str(tmp_path / "nope"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--seeds"):
        learn.parse_args(["--soma-uri", str(tmp_path), "--out", str(tmp_path), "--seeds", "0"])

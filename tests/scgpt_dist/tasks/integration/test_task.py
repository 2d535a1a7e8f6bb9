"""`python -m jobs.finetune integration` and `multiomics` end to end on a tiny synthetic census and a tiny model:
finetuning, scib metrics of every method, report (table + UMAP PNG), MLflow run; the vocabulary extension and
per-token modality plumbing of the multi-omics task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_ingest import keys
from data_ingest.synth.census import CensusSynthConfig, write_synthetic_census
from data_ingest.synth.multiome import MultiomeSynthConfig, make_multiome, write_h5ad_atomic
from data_ingest.vocab import GeneVocab
from jobs.finetune.__main__ import main
from scgpt_dist.config import ExperimentConfig, dump_config, from_dict
from scgpt_dist.model.transformer import build_model
from scgpt_dist.tasks.integration.method import METRICS

CENSUS = CensusSynthConfig(
    n_cells=240,
    n_genes=400,
    n_datasets=2,
    n_tissues=1,
    n_cell_types=3,
    types_per_tissue=3,
    markers_per_type=15,
    n_modules=4,
    genes_per_module=8,
    modules_per_type=2,
    marker_fold=10.0,
    batch_sd=0.6,
)
MODEL = {
    "model": {
        "d_model": 16,
        "n_heads": 2,
        "n_layers": 1,
        "d_hid": 32,
        "dropout": 0.0,
        "n_batches": 2,
    },
    "data": {"tokenizer": {"max_seq_len": 48}},
}


def write_model(path: Path, genes: list[str]) -> Path:
    """A random-initialised tiny model in the consolidated layout (model.safetensors, config, vocab)."""
    from safetensors.torch import save_file

    cfg = from_dict(ExperimentConfig, MODEL)
    vocab = GeneVocab.from_genes(genes)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab), vocab.pad_id)
    path.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path / keys.MODEL_FILE)
    )
    (path / keys.CONFIG_FILE).write_text(dump_config(cfg))
    vocab.save(path / keys.VOCAB_FILE)
    return path


@pytest.fixture(scope="module")
def census(tmp_path_factory) -> Path:
    return write_synthetic_census(
        tmp_path_factory.mktemp("integ") / "census", CENSUS, progress=False
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    genes = [f"SYNG{i:05d}" for i in range(CENSUS.n_genes)]
    return write_model(tmp_path_factory.mktemp("integ_model") / "model", genes)


def common(out: Path, data: Path, model: Path) -> list[str]:
    return [
        "--checkpoint", str(model), "--data", str(data), "--out", str(out),
        "--tracking-uri", f"sqlite:///{out.parent / 'mlflow.db'}",
        "--epochs", "1", "--batch-size", "16", "--scvi-epochs", "1", "--n-hvg", "200",
        "--n-pcs", "10", "--clustering", "kmeans", "--in-process",
    ]  # fmt: skip


def printed_result(stdout: str) -> dict:
    """The JSON result `main` prints last (scvi-tools prints its own lines to stdout before it)."""
    return json.loads(stdout[stdout.rindex('{\n  "task"') :])


def read_run_metrics(out: Path, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    return run.data.metrics


@pytest.mark.slow
def test_integration_task_end_to_end(census, model_dir, tmp_path, capsys):
    out = tmp_path / "integ"
    assert main(["integration", *common(out, census, model_dir)]) == 0
    result = printed_result(capsys.readouterr().out)
    methods = ("scgpt_zeroshot", "scgpt_finetuned", "pca", "harmony", "scvi")
    for m in methods:
        for k in METRICS:
            v = result[f"{m}/{k}"]
            low = (
                -0.5 if k in ("ari", "overall", "avg_bio") else 0.0
            )  # ARI is chance-adjusted: < 0 is possible
            assert low <= v <= 1.0 + 1e-6, (m, k, v)
    # The synthetic census's planted cell types are strong: PCA recovers them; its datasets differ.
    assert result["pca/nmi"] > 0.6
    assert result["harmony/asw_batch"] >= result["pca/asw_batch"] - 0.02
    assert (
        np.isfinite(result["scgpt_finetuned/final_dar"]) and result["scgpt_finetuned/final_ecs"] > 0
    )
    report = (out / "report" / "report.md").read_text()
    assert "scib metrics (sorted by overall)" in report
    for m in methods:
        assert f"| {m} |" in report
    png = out / "report" / "umap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    saved = json.loads((out / "report" / "results.json").read_text())
    assert saved["metrics"]["pca/overall"] == pytest.approx(result["pca/overall"])
    logged = read_run_metrics(out, result["run_id"])
    assert logged["scgpt_finetuned/overall"] == pytest.approx(result["scgpt_finetuned/overall"])
    assert "scgpt_finetuned/train_gep" in logged


def test_integration_needs_two_batches(model_dir, tmp_path, census):
    out = tmp_path / "one"
    args = common(out, census, model_dir) + ["--obs-filter", "dataset_id == 'synth-dataset-0000'"]
    with pytest.raises(ValueError, match="more than one batch"):
        main(["integration", *args])


@pytest.mark.slow
def test_multiomics_task_end_to_end(model_dir, tmp_path, capsys):
    from scgpt_dist.tasks.finetune import adapt_model
    from scgpt_dist.tasks.multiomics.task import concat_tokens
    from scgpt_dist.train.checkpoint import load_consolidated
    from scgpt_dist.train.warmstart import extended_vocab

    cite = make_multiome(MultiomeSynthConfig(n_cells=200, n_batches=2, n_proteins=6), CENSUS)
    data = write_h5ad_atomic(cite, tmp_path / "cite.h5ad")
    prot = [v for v in cite.var_names if v.startswith("PROT_")]

    # Vocabulary extension appends, and the pretrained rows are carried over (the one growth path).
    loaded = load_consolidated(model_dir)
    vocab, added = extended_vocab(loaded.vocab, prot)
    assert added == prot and len(vocab) == len(loaded.vocab) + 6
    assert all(vocab[g] == loaded.vocab[g] for g in ("SYNG00000", "SYNG00399", keys.CLS_TOKEN))
    model, fresh = adapt_model(loaded, vocab=vocab, use_modality=True)
    assert "encoder.embedding.weight" not in fresh and "modality_encoder.embedding.weight" in fresh
    old = loaded.model.encoder.embedding.weight
    grown = model.encoder.embedding.weight
    assert grown.shape == (len(vocab), old.shape[1]) and torch.equal(grown[: len(old)], old)
    genes = old[len(keys.SPECIAL_TOKENS) :]
    assert torch.all((grown[len(old) :] - genes.mean(0)).abs() <= 0.6 * genes.std(0) + 1e-6)

    # Joined token rows: <cls>, RNA genes, then every protein, with per-token modality.
    from data_ingest.tokenize import TokenizerConfig
    from scgpt_dist.inference import tokenize_anndata

    rna = cite[:, ~cite.var_names.str.startswith("PROT_")]
    tok = TokenizerConfig(max_seq_len=20)
    joint = concat_tokens(
        tokenize_anndata(rna, vocab, tok),
        tokenize_anndata(cite[:, prot], vocab, TokenizerConfig(max_seq_len=7)),
    )
    rna_rows = tokenize_anndata(rna, vocab, tok).to_pylist()
    prot_ids = sorted(vocab[p] for p in prot)
    for row, rna_row in zip(joint.to_pylist(), rna_rows, strict=True):
        n = len(rna_row[keys.GENES])
        assert row[keys.GENES][:n] == rna_row[keys.GENES] and row[keys.GENES][0] == vocab.cls_id
        assert row[keys.VALUES][:n] == rna_row[keys.VALUES]
        assert sorted(row[keys.GENES][n:]) == prot_ids
        assert all(0 < v < 51 for v in row[keys.VALUES][n:])  # proteins are dense: every one binned
        assert row[keys.MODALITY] == [keys.MODALITY_RNA] * n + [keys.MODALITY_PROTEIN] * 6

    out = tmp_path / "mo"
    args = common(out, data, model_dir) + ["--no-umap", "--no-rna-arm"]
    assert main(["multiomics", *args]) == 0
    result = printed_result(capsys.readouterr().out)
    for m in (
        "scgpt_zeroshot_rna",
        "scgpt_finetuned_joint",
        "pca_rna",
        "pca_joint",
        "harmony_joint",
        "totalvi",
    ):
        assert -0.2 <= result[f"{m}/overall"] <= 1.0, m
    # Proteins are planted cell-type markers: adding them to the PCA does not lose the cell types.
    assert result["pca_joint/nmi"] > 0.6
    report = (out / "report" / "report.md").read_text()
    assert "Vocabulary extended by 6 protein tokens" in report

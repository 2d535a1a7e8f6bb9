"""Perturbation prediction: split (no test gene trained on), context genes, metrics, baselines on planted
data, and a tiny flag-token model that learns the knock-down of genes it never saw perturbed."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from data_ingest import keys
from data_ingest.synth.census import CensusSynthConfig, CensusTruth
from data_ingest.synth.perturb import PerturbSynthConfig, make_perturbation_data
from scgpt_dist.preprocess import log_normalize
from scgpt_dist.tasks.perturbation import method as pt

CENSUS = CensusSynthConfig(
    n_cells=3000,
    n_genes=400,
    n_datasets=3,
    n_tissues=2,
    n_cell_types=4,
    types_per_tissue=3,
    n_modules=6,
    genes_per_module=10,
    modules_per_type=2,
    markers_per_type=10,
)
SCREEN = PerturbSynthConfig(
    n_control_cells=200, cells_per_perturbation=40, n_single=10, n_double=8, seed=0
)


def small_screen() -> ad.AnnData:
    """A small synthetic screen (200 control cells, 10 singles, 8 doubles x 40 cells, 400 genes)."""
    return make_perturbation_data(CensusTruth(CENSUS), SCREEN)


def tiny_model_dir(out: Path, genes: list[str], max_seq_len: int = 48, seed: int = 0) -> Path:
    """A consolidated model directory of a tiny untrained scGPT over `genes` (as `jobs.pretrain` writes)."""
    from safetensors.torch import save_file

    from data_ingest.vocab import GeneVocab
    from scgpt_dist.config import ExperimentConfig, ModelConfig, dump_config
    from scgpt_dist.model.transformer import build_model

    cfg = ExperimentConfig()
    cfg.model = ModelConfig(d_model=32, n_heads=2, n_layers=1, d_hid=64, dropout=0.0, n_batches=3)
    cfg.data.tokenizer.max_seq_len = max_seq_len
    vocab = GeneVocab.from_genes(genes)
    torch.manual_seed(seed)
    model = build_model(cfg.model, len(vocab), vocab.pad_id)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / keys.MODEL_FILE)
    )
    (out / keys.CONFIG_FILE).write_text(dump_config(cfg))
    vocab.save(out / keys.VOCAB_FILE)
    return out


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    return small_screen()


@pytest.fixture(scope="module")
def prepared(screen):
    labels = screen.obs[keys.OBS_PERTURBATION].astype(str).to_numpy()
    names = sorted(set(labels) - {keys.CONTROL_CONDITION})
    split = pt.split_perturbations(names, 0.3, 0.5, seed=0)
    data = pt.build_response_data(
        log_normalize(screen.X), list(screen.var_names), labels, split.train, n_genes=47
    )
    return split, data


def test_split_holds_out_unseen_genes(screen):
    names = sorted(set(screen.obs[keys.OBS_PERTURBATION]) - {keys.CONTROL_CONDITION})
    split = pt.split_perturbations(names, 0.3, 0.5, seed=0)
    trained_genes = {g for n in split.train for g in pt.targets_of(n)}
    assert len(split.unseen_single) == 3
    for n in split.unseen_single + split.double_unseen:
        assert set(pt.targets_of(n)) - trained_genes
    for n in split.double_seen:
        assert set(pt.targets_of(n)) <= trained_genes and n not in split.train
    every = split.train + split.unseen_single + split.double_seen + split.double_unseen
    assert sorted(every) == names  # a partition
    assert split == pt.split_perturbations(names, 0.3, 0.5, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        pt.split_perturbations(["A+ctrl"])


def test_context_genes_targets_first_from_training_cells(screen, prepared):
    split, data = prepared
    names = set(screen.obs[keys.OBS_PERTURBATION]) - {keys.CONTROL_CONDITION}
    targets = sorted({g for n in names for g in pt.targets_of(n)})
    assert data.genes[: len(targets)] == targets and len(data.genes) == 47
    assert len(set(data.genes)) == 47
    assert data.ctrl.shape == (200, 47) and all(v.shape == (40, 47) for v in data.cells.values())
    with pytest.raises(ValueError, match="fewer than"):
        pt.build_response_data(
            log_normalize(screen.X),
            list(screen.var_names),
            screen.obs[keys.OBS_PERTURBATION].astype(str).to_numpy(),
            split.train,
            n_genes=3,
        )


def test_metrics():
    rng = np.random.default_rng(0)
    ctrl = rng.random(30)
    true = ctrl + rng.normal(0, 1, 30)
    de = np.arange(20)
    perfect = pt.response_metrics(true, true, ctrl, de)
    assert perfect["pearson_delta"] == pytest.approx(1.0) and perfect["mse"] == 0.0
    flipped = pt.response_metrics(2 * ctrl - true, true, ctrl, de)
    assert flipped["pearson_delta"] == pytest.approx(-1.0)
    none = pt.response_metrics(ctrl, true, ctrl, de)
    assert np.isnan(none["pearson_delta"]) and none["mse"] > 0
    # DE genes: the genes shifted between the groups rank first.
    a = rng.normal(0, 1, (50, 10))
    b = rng.normal(0, 1, (50, 10))
    b[:, [3, 7]] += 3.0
    assert set(pt.de_genes(a, b, k=2)) == {3, 7}


def test_baselines_on_planted_data(prepared):
    split, data = prepared
    test = split.unseen_single + split.double_seen + split.double_unseen
    add = pt.baseline_additive(data, split.train, test)
    assert set(add) == set(split.double_seen)
    n = split.double_seen[0]
    a, b = pt.targets_of(n)
    ma, mb = data.mean(f"{a}+ctrl"), data.mean(f"{b}+ctrl")
    np.testing.assert_allclose(add[n], ma + mb - data.ctrl_mean, rtol=1e-5)

    def mean_metric(preds, names, metric):
        return np.nanmean(
            [
                pt.response_metrics(
                    preds[x], data.mean(x), data.ctrl_mean, pt.de_genes(data.ctrl, data.cells[x])
                )[metric]
                for x in names
            ]
        )

    none = pt.baseline_no_change(data, test)
    mean = pt.baseline_mean_perturbed(data, split.train, test)
    lin = pt.baseline_linear(data, split.train, test, pt.pca_gene_features(data, split.train, 5))
    # With planted effects, using the training responses beats predicting no change.
    assert mean_metric(add, split.double_seen, "mse") < mean_metric(none, split.double_seen, "mse")
    assert mean_metric(mean, test, "mse") < mean_metric(none, test, "mse")
    assert mean_metric(mean, test, "pearson_delta") > 0.3
    assert np.isfinite(mean_metric(lin, test, "pearson_delta"))


def test_flag_model_learns_knockdown_of_unseen_genes(tmp_path, prepared):
    from scgpt_dist.train.checkpoint import load_consolidated

    torch.set_num_threads(1)  # a busy 2-core machine: more threads only contend
    split, data = prepared
    loaded = load_consolidated(tiny_model_dir(tmp_path / "model", data.genes))
    predictor = pt.PerturbationPredictor(loaded, data, batch_index=0, seed=0)
    assert predictor.fresh == ["pert_encoder.weight"]
    cfg = pt.PerturbationTrainConfig(epochs=6, batch_size=32, lr=3e-3, seed=0)
    losses = predictor.fit(split.train, cfg)
    assert losses[-1] < 0.5 * losses[0]
    unseen = split.unseen_single
    preds = predictor.predict_means(unseen, n_controls=100, seed=0)
    again = predictor.predict_means(unseen, n_controls=100, seed=0)
    assert all(np.array_equal(preds[n], again[n]) for n in unseen)
    # The flag alone says "knocked down": the unseen target's predicted change is clearly negative,
    # below the change the model predicts for the other genes.
    for n in unseen:
        i = data.gene_index(pt.targets_of(n))[0]
        delta = preds[n] - data.ctrl_mean
        assert delta[i] < -0.3 and delta[i] < np.median(delta) - 0.3, (n, delta[i])


def test_head_calibration_moves_outputs_to_the_target_scale(tmp_path, prepared):
    from scgpt_dist.train.checkpoint import load_consolidated

    torch.set_num_threads(1)
    _, data = prepared
    loaded = load_consolidated(tiny_model_dir(tmp_path / "model", data.genes, seed=1))
    predictor = pt.PerturbationPredictor(loaded, data, seed=0)

    rows = np.random.default_rng(0).choice(len(data.ctrl), 128, replace=False)  # calibrate_head's

    def ctrl_mse() -> float:
        flags = np.zeros((128, len(data.genes)), np.int64)
        with torch.no_grad():
            pred = predictor.model(**predictor._inputs(rows, flags))["gep"][:, 1:].numpy()
        return float(np.mean((pred - data.ctrl[rows]) ** 2))

    before = ctrl_mse()
    predictor.calibrate_head(n_cells=128, seed=0)
    after = ctrl_mse()
    assert after < before  # the least-squares fit on these very cells can only lower their error
    assert after <= np.var(data.ctrl[rows]) + 1e-6  # no worse than predicting their mean

"""Synthetic perturbation screens: same genes and control distribution as the census, planted effects present
in the counts, doubles partly non-additive, deterministic, and a working CLI."""

import json

import anndata as ad
import numpy as np
import pytest

from data_ingest import keys
from data_ingest.synth.census import CensusSynthConfig, CensusTruth
from data_ingest.synth.perturb import (
    PerturbationScreen,
    PerturbSynthConfig,
    main,
    make_perturbation_data,
    perturbation_genes,
)

CENSUS = CensusSynthConfig(
    n_cells=3000,
    n_genes=600,
    n_datasets=3,
    n_tissues=2,
    n_cell_types=4,
    types_per_tissue=3,
    n_modules=6,
    genes_per_module=10,
    modules_per_type=2,
    markers_per_type=10,
)
PERT = PerturbSynthConfig(
    n_control_cells=300, cells_per_perturbation=60, n_single=8, n_double=6, block_cells=128
)


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    return make_perturbation_data(CensusTruth(CENSUS), PERT)


def _log_means(adata: ad.AnnData) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    X = adata.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    lab = adata.obs[keys.OBS_PERTURBATION].to_numpy()
    return X[lab == keys.CONTROL_CONDITION].mean(0), {
        n: X[lab == n].mean(0) for n in set(lab) - {keys.CONTROL_CONDITION}
    }


def test_layout_and_census_genes(screen):
    truth = CensusTruth(CENSUS)
    assert list(screen.var_names) == truth.gene_names
    obs = screen.obs
    assert (obs[keys.OBS_PERTURBATION] == keys.CONTROL_CONDITION).sum() == 300
    names = sorted(set(obs[keys.OBS_PERTURBATION]) - {keys.CONTROL_CONDITION})
    assert len(names) == 8 + 6
    assert sum(n.endswith("+" + keys.CONTROL_CONDITION) for n in names) == 8
    assert set(obs[keys.OBS_CONDITION]) == {"ctrl", "single", "double"}
    assert obs[keys.OBS_CELL_TYPE].nunique() == 1 and obs[keys.OBS_DATASET].nunique() == 1
    info = json.loads(screen.uns[keys.UNS_PERTURBATION_TRUTH])
    assert [p["name"] for p in info["perturbations"]] == list(
        screen.uns[keys.UNS_EXPECTED_LFC_INDEX]
    )
    assert screen.uns[keys.UNS_EXPECTED_LFC].shape == (14, CENSUS.n_genes)
    # Every double is made of two of the singles.
    singles = {perturbation_genes(n)[0] for n in names if len(perturbation_genes(n)) == 1}
    for n in names:
        assert set(perturbation_genes(n)) <= singles


def test_control_cells_match_the_census_model(screen):
    """Control cells' mean expression follows the census's baseline for that dataset and type."""
    truth = CensusTruth(CENSUS)
    scr = PerturbationScreen(truth, PERT)
    ctrl, _ = scr.rates(None, np.full(1, 1.0), np.ones((1, CENSUS.modules_per_type)))
    lab = screen.obs[keys.OBS_PERTURBATION].to_numpy()
    X = screen.X[lab == keys.CONTROL_CONDITION].toarray()
    observed = X.sum(0) / X.sum()
    expected = ctrl[0] / ctrl[0].sum()
    top = np.argsort(-expected)[:100]
    assert np.corrcoef(np.log(observed[top] + 1e-6), np.log(expected[top]))[0, 1] > 0.95


def test_planted_effects_are_in_the_counts(screen):
    ctrl, means = _log_means(screen)
    info = json.loads(screen.uns[keys.UNS_PERTURBATION_TRUTH])
    lfc = screen.uns[keys.UNS_EXPECTED_LFC]
    genes = list(screen.var_names)
    for i, p in enumerate(info["perturbations"]):
        delta = means[p["name"]] - ctrl
        # Knock-down: every target drops (to about 10% of its rate).
        for g in p["targets"]:
            assert delta[genes.index(g)] < -0.5, (p["name"], g)
        # The change in the counts follows the planted expected log fold change.
        assert np.corrcoef(delta, lfc[i])[0, 1] > 0.5, p["name"]
        # A target in an active module takes its module partners down.
        for g, role in zip(p["targets"], p["target_roles"], strict=True):
            if role == "module":
                module = next(m for m in info["active_modules"] if g in m)
                partners = [genes.index(x) for x in module if x not in p["targets"]]
                assert delta[partners].mean() < -0.05, (p["name"], g)
    generic = [genes.index(g) for g in info["generic_genes"]]
    assert np.mean([(means[n] - ctrl)[generic].mean() for n in means]) > 0.2


def test_doubles_are_partly_non_additive(screen):
    info = json.loads(screen.uns[keys.UNS_PERTURBATION_TRUTH])
    lfc = screen.uns[keys.UNS_EXPECTED_LFC]
    index = list(screen.uns[keys.UNS_EXPECTED_LFC_INDEX])
    single = {p["targets"][0]: index.index(p["name"]) for p in info["perturbations"][:8]}
    gaps = {}
    for i, p in enumerate(info["perturbations"][8:], start=8):
        a, b = p["targets"]
        additive = lfc[single[a]] + lfc[single[b]]
        gaps[p["interaction"]] = max(
            gaps.get(p["interaction"], 0.0), np.abs(lfc[i] - additive).max()
        )
    assert any(gap > 0.5 for kind, gap in gaps.items() if kind != "additive"), gaps
    # The shared response saturates: even an `additive` double is not the sum of its singles there.
    assert len(gaps) >= 2


def test_deterministic_and_cli(screen, tmp_path):
    again = make_perturbation_data(CensusTruth(CENSUS), PERT)
    assert (again.X != screen.X).nnz == 0
    assert again.obs.equals(screen.obs)
    other = make_perturbation_data(
        CensusTruth(CENSUS), PerturbSynthConfig(**{**PERT.__dict__, "seed": 1})
    )
    assert other.uns[keys.UNS_PERTURBATION_TRUTH] != screen.uns[keys.UNS_PERTURBATION_TRUTH]

    truth_json = tmp_path / "census.ground_truth.json"
    truth_json.write_text(json.dumps(CensusTruth(CENSUS).to_json()))
    out = tmp_path / "p.h5ad"
    argv = ["--out", str(out), "--census-truth", str(truth_json), "--control-cells", "300"]
    argv += ["--cells-per-perturbation", "60", "--singles", "8", "--doubles", "6"]
    assert main(argv) == 0
    cli = ad.read_h5ad(out)
    assert cli.n_obs == screen.n_obs and (cli.X != screen.X).nnz == 0
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):  # exit 2 via run_main
        main(argv)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="knockdown"):
        PerturbSynthConfig(knockdown=0.0)
    with pytest.raises(ValueError, match="pair into"):
        PerturbSynthConfig(n_single=3, n_double=4)
    with pytest.raises(ValueError, match="cell type"):
        PerturbationScreen(CensusTruth(CENSUS), PerturbSynthConfig(cell_type="nope"))

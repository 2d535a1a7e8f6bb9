"""The synthetic census: census layout, rows grouped by dataset, planted programs recoverable, bounded blocks."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.synth.census import (
    GROUND_TRUTH_SUFFIX,
    CensusSynthConfig,
    experiment_uri,
    main,
    write_synthetic_census,
)
from data_ingest.synth.small import SynthConfig, make_synthetic

SMALL = dict(
    n_cells=3000,
    n_genes=1500,
    n_datasets=6,
    n_tissues=3,
    n_cell_types=8,
    types_per_tissue=4,
    n_modules=6,
    genes_per_module=10,
    modules_per_type=2,
    block_cells=700,
)


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    uri = write_synthetic_census(root / "census", CensusSynthConfig(**SMALL), progress=False)
    return uri


def _read(uri):
    import tiledbsoma

    with tiledbsoma.Experiment.open(experiment_uri(uri)) as exp:
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms[keys.MEASUREMENT_RNA].var.read().concat().to_pandas()
        coo = exp.ms[keys.MEASUREMENT_RNA].X[keys.RAW_LAYER].read().tables().concat()
    X = sp.csr_matrix(
        (coo["soma_data"].to_numpy(), (coo["soma_dim_0"].to_numpy(), coo["soma_dim_1"].to_numpy())),
        shape=(len(obs), len(var)),
    )
    return obs, var, X


def test_layout_and_ground_truth(census):
    import cellxgene_census

    obs, var, X = _read(census)
    assert len(obs) == 3000 and len(var) == 1500
    for col in (
        keys.OBS_DATASET,
        keys.OBS_CELL_TYPE,
        keys.OBS_TISSUE_GENERAL,
        keys.OBS_ASSAY,
        keys.OBS_IS_PRIMARY,
        keys.OBS_DISEASE,
    ):
        assert col in obs
    assert {keys.VAR_GENE_ID, keys.VAR_GENE_NAME} <= set(var.columns)
    # Rows grouped by dataset, like the census: each dataset is one contiguous run of soma_joinids.
    runs = (obs[keys.OBS_DATASET] != obs[keys.OBS_DATASET].shift()).sum()
    assert runs == obs[keys.OBS_DATASET].nunique() == 6
    # Count-like and sparse: integer values, a few percent non-zero, obs nnz matches X.
    assert np.array_equal(X.data, np.round(X.data)) and X.data.min() >= 1
    assert 0.02 < X.nnz / (3000 * 1500) < 0.6
    assert np.array_equal(obs[keys.OBS_NNZ].to_numpy(), np.diff(X.indptr))
    # cellxgene_census opens it as a census by URI.
    with cellxgene_census.open_soma(uri=str(census)) as c:
        assert keys.DEFAULT_ORGANISM in c[keys.CENSUS_DATA]
        assert len(c[keys.CENSUS_INFO][keys.CENSUS_DATASETS].read().concat()) == 6

    truth = json.loads((census.parent / (census.name + GROUND_TRUTH_SUFFIX)).read_text())
    names = var[keys.VAR_GENE_NAME].tolist()
    norm = sp.diags(1.0 / np.asarray(X.sum(1)).ravel()) @ X
    lognorm = np.log1p(norm.toarray() * 1e4)
    # Planted markers: higher in their cell type than elsewhere.
    lifts = []
    for ctype, markers in truth["marker_genes"].items():
        cells = (obs[keys.OBS_CELL_TYPE] == ctype).to_numpy()
        if cells.sum() < 20:
            continue
        cols = [names.index(m) for m in markers]
        lifts.append(lognorm[cells][:, cols].mean() - lognorm[~cells][:, cols].mean())
    assert len(lifts) >= 4 and min(lifts) > 0.5
    # Planted network: genes of a module correlate within the cells where it is active.
    mod = truth["modules"][0]
    active = obs[keys.OBS_CELL_TYPE].isin(mod["active_in"]).to_numpy()
    sub = lognorm[active][:, [names.index(g) for g in mod["genes"]]]
    corr = np.corrcoef(sub.T)
    inside = corr[np.triu_indices(len(corr), 1)].mean()
    rand_cols = np.random.default_rng(0).choice(len(names), len(mod["genes"]), replace=False)
    rc = np.nan_to_num(np.corrcoef(lognorm[active][:, rand_cols].T))
    assert inside > 0.1 and inside > rc[np.triu_indices(len(rc), 1)].mean() + 0.1
    assert len(truth["coexpression_edges"]) > 0 and len(truth["datasets"]) == 6


def test_deterministic_refuses_overwrite_and_cli(census, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_census(census, CensusSynthConfig(**SMALL), progress=False)
    argv = ["--out", str(tmp_path / "c"), "--cells", "3000", "--genes", "1500", "--datasets", "6"]
    argv += ["--tissues", "3", "--cell-types", "8", "--block-cells", "700", "--no-progress"]
    assert main(argv) == 0
    obs, _, X = _read(tmp_path / "c")
    assert len(obs) == 3000 and sorted(p.name for p in tmp_path.iterdir()) == [
        "c",
        "c" + GROUND_TRUTH_SUFFIX,
    ]
    again = write_synthetic_census(tmp_path / "d", CensusSynthConfig(**SMALL), progress=False)
    obs1, _, X1 = _read(census)
    obs2, _, X2 = _read(again)
    assert obs1.equals(obs2) and (X1 != X2).nnz == 0
    with pytest.raises(ValueError, match="too small"):
        CensusSynthConfig(n_genes=100)


def test_make_synthetic_unchanged_for_the_demo():
    a = make_synthetic(SynthConfig(n_cells=50, n_genes=40, markers_per_type=3))
    b = make_synthetic(SynthConfig(n_cells=50, n_genes=40, markers_per_type=3))
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert set(a.obs.columns) == {"cell_type", "batch"} and "planted_programs" in a.uns

"""The independent Splat simulator: count data with the structure the model's checks rely on."""

import numpy as np
import tiledbsoma

from data_ingest import keys
from data_ingest.synth.splat import SplatConfig, simulate, write_splat_experiment


def test_simulate_counts_groups_and_batches():
    cfg = SplatConfig(n_cells=1500, n_genes=300, n_groups=5, n_batches=3, seed=1)
    a = simulate(cfg)
    X = a.X.tocsr()
    assert a.n_vars == 300 and 0 < a.n_obs <= 1500
    assert np.array_equal(X.data, np.round(X.data)) and X.data.min() >= 1
    assert np.diff(X.indptr).min() > 0  # no empty cells
    assert 0.1 < (X.data == 1).mean() < 0.9  # many 1s: droplet-like counts
    batches = a.obs[keys.OBS_DATASET].to_numpy()
    assert (batches[1:] >= batches[:-1]).all()  # rows grouped by batch, as census datasets
    sizes = a.obs[keys.OBS_CELL_TYPE].value_counts()
    assert len(sizes) == 5 and sizes.max() > 2 * sizes.min()  # unequal group sizes
    # Groups differ: group mean profiles are far apart compared with two halves of one group.
    lib = np.asarray(X.sum(1)).ravel()
    logx = np.log1p((X.multiply(1e4 / lib[:, None])).toarray())
    groups = a.obs[keys.OBS_CELL_TYPE].to_numpy()
    big = sizes.index[:2]
    m0, m1 = (logx[groups == g].mean(0) for g in big)
    rows0 = np.flatnonzero(groups == big[0])
    h0, h1 = logx[rows0[::2]].mean(0), logx[rows0[1::2]].mean(0)
    assert np.abs(m0 - m1).sum() > 3 * np.abs(h0 - h1).sum()
    assert np.array_equal(simulate(cfg).X.toarray(), X.toarray())  # deterministic given the seed


def test_written_experiment_has_the_census_columns(tmp_path):
    uri = write_splat_experiment(tmp_path / "splat", SplatConfig(n_cells=300, n_genes=100))
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        obs = exp.obs.read().concat().to_pandas()
        assert {keys.OBS_CELL_TYPE, keys.OBS_DATASET} <= set(obs.columns)
        assert obs[keys.OBS_DATASET].nunique() == SplatConfig.n_batches
        assert keys.RAW_LAYER in exp.ms[keys.MEASUREMENT_RNA].X

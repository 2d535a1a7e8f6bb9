"""The census path against a local collection with the CELLxGENE Census layout, and pinned-version errors."""

import numpy as np
import pytest

from data_ingest import keys
from data_ingest.source import ALL, SomaCellSource, SourceConfig, census_locator
from data_ingest.synth.census import CensusSynthConfig, experiment_uri, write_synthetic_census
from data_ingest.tokenize import TokenizerConfig
from data_ingest.vocab import GeneVocab


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    cfg = CensusSynthConfig(
        n_cells=1200,
        n_genes=800,
        n_datasets=8,
        n_tissues=3,
        n_cell_types=6,
        types_per_tissue=3,
        n_modules=4,
        genes_per_module=8,
        modules_per_type=2,
        non_primary_fraction=0.3,
        block_cells=500,
    )
    return write_synthetic_census(tmp_path_factory.mktemp("c") / "census", cfg, progress=False)


def _obs(census):
    import tiledbsoma

    with tiledbsoma.Experiment.open(experiment_uri(census)) as exp:
        return exp.obs.read().concat().to_pandas()


def test_census_layout_defaults_to_primary_cells(census):
    obs = _obs(census)
    assert 0 < (~obs[keys.OBS_IS_PRIMARY]).sum() < len(obs)  # the fixture has duplicates to drop
    src = SomaCellSource(SourceConfig(soma_uri=str(census), holdout_fraction=0.0))
    assert src.value_filter == keys.PRIMARY_FILTER
    vocab = GeneVocab.from_genes(src.gene_names())
    res = src.resolve(vocab, ALL)
    assert res.joinids.tolist() == obs.soma_joinid[obs[keys.OBS_IS_PRIMARY]].tolist()
    assert res.soma_uri.endswith(f"{keys.CENSUS_DATA}/{keys.DEFAULT_ORGANISM}")
    # Opening the experiment directly is not the census layout: no implicit filter.
    direct = SomaCellSource(SourceConfig(soma_uri=experiment_uri(census), holdout_fraction=0.0))
    assert direct.value_filter is None and len(direct.resolve(vocab, ALL).joinids) == len(obs)


def test_tissue_assay_and_user_filters_combine(census):
    obs = _obs(census)
    tissue = obs[keys.OBS_TISSUE_GENERAL].iloc[0]
    assay = obs[keys.OBS_ASSAY].iloc[-1]
    cfg = SourceConfig(
        soma_uri=str(census),
        holdout_fraction=0.0,
        tissues=[tissue],
        assays=[assay, "no such assay"],
        value_filter="nnz >= 10",
    )
    src = SomaCellSource(cfg)
    want = obs[
        obs[keys.OBS_IS_PRIMARY]
        & (obs[keys.OBS_TISSUE_GENERAL] == tissue)
        & obs[keys.OBS_ASSAY].isin([assay])
        & (obs[keys.OBS_NNZ] >= 10)
    ].soma_joinid
    vocab = GeneVocab.from_genes(src.gene_names())
    if len(want) == 0:
        with pytest.raises(ValueError, match="selects no cells"):
            src.resolve(vocab, ALL)
    else:
        assert src.resolve(vocab, ALL).joinids.tolist() == want.tolist()
    with pytest.raises(ValueError, match="selects no cells"):
        SomaCellSource(SourceConfig(soma_uri=str(census), tissues=["no such tissue"])).resolve(
            vocab, ALL
        )
    with pytest.raises(ValueError, match="no organism 'mus_musculus'"):
        SomaCellSource(SourceConfig(soma_uri=str(census), organism="mus_musculus")).gene_names()


def test_census_cells_tokenize_from_read_tasks(census):
    from data_ingest.datasource import read_token_table

    src = SomaCellSource(SourceConfig(soma_uri=str(census), holdout_fraction=0.0))
    vocab = GeneVocab.from_genes(src.gene_names())
    res = src.resolve(vocab, ALL)
    tab = read_token_table(res, res.joinids[:40], TokenizerConfig(max_seq_len=64), vocab.cls_id)
    assert tab.num_rows == 40 and np.array_equal(tab[keys.CELL_ID].to_numpy(), res.joinids[:40])


def test_census_version_must_be_pinned_and_exist(monkeypatch):
    import cellxgene_census

    with pytest.raises(ValueError, match="pin a release"):
        census_locator("latest", keys.DEFAULT_ORGANISM)
    with pytest.raises(ValueError, match="pin a release"):
        SomaCellSource(SourceConfig(census_version="stable")).gene_names()
    # This machine is offline: the release directory is unreachable, and the error says what to do.
    with pytest.raises(ValueError, match="unreachable.*soma_uri"):
        census_locator("2025-01-30", keys.DEFAULT_ORGANISM)
    # Reachable directory (a stand-in for the network): an unknown release lists the available ones.
    directory = {"stable": {}, "latest": {}, "2024-07-01": {}, "2025-01-30": {}}
    monkeypatch.setattr(cellxgene_census, "get_census_version_directory", lambda: directory)
    with pytest.raises(
        ValueError, match="does not exist; available releases: 2024-07-01, 2025-01-30"
    ):
        census_locator("2023-01-01", keys.DEFAULT_ORGANISM)
    monkeypatch.setattr(
        cellxgene_census,
        "get_census_version_description",
        lambda v: {
            "soma": {"uri": "s3://bucket/cell-census/2025-01-30/soma/", "s3_region": "us-west-2"}
        },
    )
    uri, config = census_locator("2025-01-30", keys.DEFAULT_ORGANISM)
    assert uri == "s3://bucket/cell-census/2025-01-30/soma/census_data/homo_sapiens"
    assert config["vfs.s3.region"] == "us-west-2"


def test_queries_cut_by_obs_nnz_read_the_same_records(census):
    import dataclasses

    from data_ingest.datasource import query_bounds, read_token_table, x_buffer_entries

    src = SomaCellSource(SourceConfig(soma_uri=str(census), holdout_fraction=0.0))
    vocab = GeneVocab.from_genes(src.gene_names())
    res = src.resolve(vocab, ALL)
    ids = res.joinids[::2]
    tok = TokenizerConfig(max_seq_len=32, seed=2)
    obs = _obs(census).set_index(keys.SOMA_JOINID).loc[ids]
    small = {"soma.init_buffer_bytes": str(8 * 3000)}  # ~3,000 entries a round: many cuts
    bounds = query_bounds(len(ids), 2048, obs[keys.OBS_NNZ].to_numpy(), x_buffer_entries(small))
    assert len(bounds) > 10  # the cut happens (the census has obs nnz)
    cut = read_token_table(dataclasses.replace(res, tiledb_config=small), ids, tok, vocab.cls_id)
    whole = read_token_table(res, ids, tok, vocab.cls_id, io_cells=len(ids))
    assert cut.num_rows == len(ids) and cut.equals(whole)

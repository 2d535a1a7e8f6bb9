"""Writing AnnData to SOMA, and every bad-input case: a clear error and nothing half-written."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_ingest.soma_store import read_h5ad_checked, to_census_layout, write_experiment
from data_ingest.source import SomaCellSource, SourceConfig


def _adata(n=30, g=12, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.poisson(1.0, (n, g)).astype(np.float32))
    obs = pd.DataFrame({"ct": rng.choice(["a", "b"], n)}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_write_and_read_back(tmp_path):
    import tiledbsoma

    a, b = _adata(seed=0), _adata(n=10, g=15, seed=1)
    uri = write_experiment(
        tmp_path / "exp",
        [to_census_layout(a, "ds_a", "ct", "counts"), to_census_layout(b, "ds_b", "ct", "counts")],
    )
    assert _leftovers(tmp_path) == ["exp"]  # the temporary path was renamed away
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        obs = exp.obs.read().concat().to_pandas()
        assert len(obs) == 40 and set(obs["dataset_id"]) == {"ds_a", "ds_b"}
        assert set(obs["cell_type"]) <= {"a", "b"}
        X = exp.ms["RNA"].X["raw"].read().tables().concat()
        assert np.isclose(X["soma_data"].to_numpy().sum(), a.X.sum() + b.X.sum())
    genes = SomaCellSource(SourceConfig(soma_uri=str(uri))).gene_names()
    assert sorted(genes) == sorted(f"G{i}" for i in range(15))


def test_refuses_to_overwrite(tmp_path):
    part = to_census_layout(_adata(), "ds", "ct", "counts")
    write_experiment(tmp_path / "exp", [part])
    with pytest.raises(FileExistsError, match="already exists"):
        write_experiment(tmp_path / "exp", [part])


def test_bad_anndata_inputs(tmp_path):
    neg = _adata()
    neg.X = neg.X.toarray() - 1.0
    with pytest.raises(ValueError, match="negative expression"):
        to_census_layout(neg, "ds", "ct", "counts")

    nameless = _adata()
    nameless.var_names = [str(i) for i in range(nameless.n_vars)]
    with pytest.raises(ValueError, match="no gene names"):
        to_census_layout(nameless, "ds", "ct", "counts")

    dup = _adata()
    dup.var_names = ["G0"] * dup.n_vars
    with pytest.raises(ValueError, match="var_names_make_unique"):
        to_census_layout(dup, "ds", "ct", "counts")

    with pytest.raises(ValueError, match="no obs column 'celltype'"):
        to_census_layout(_adata(), "ds", "celltype", "counts")


def test_missing_and_corrupt_h5ad(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .h5ad file"):
        read_h5ad_checked(tmp_path / "nope.h5ad")
    good = tmp_path / "good.h5ad"
    _adata().write_h5ad(good)
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(good.read_bytes()[:500])  # truncated file
    with pytest.raises(ValueError, match="not a readable .h5ad"):
        read_h5ad_checked(bad)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import tiledbsoma.io

    def boom(uri, *args, **kwargs):
        from pathlib import Path

        Path(uri).mkdir()
        (Path(uri) / "partial").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(tiledbsoma.io, "from_anndata", boom)
    with pytest.raises(OSError, match="disk full"):
        write_experiment(tmp_path / "exp", [to_census_layout(_adata(), "ds", "ct", "counts")])
    assert _leftovers(tmp_path) == []


def test_bad_soma_uri_and_filters(tmp_path, demo_soma):
    from data_ingest.vocab import GeneVocab

    with pytest.raises(ValueError, match="cannot open a SOMA experiment"):
        SomaCellSource(SourceConfig(soma_uri=str(tmp_path / "missing"))).gene_names()
    src = SomaCellSource(
        SourceConfig(soma_uri=str(demo_soma), layer="data", value_filter="cell_type == 'nope'")
    )
    vocab = GeneVocab.from_genes(src.gene_names())
    with pytest.raises(ValueError, match="selects no cells"):
        src.resolve(vocab)
    with pytest.raises(ValueError, match="no X layer 'raw'"):
        SomaCellSource(SourceConfig(soma_uri=str(demo_soma))).gene_names()
    other = GeneVocab.from_genes(["NOT_A_GENE"])
    with pytest.raises(ValueError, match="none of the .* genes"):
        SomaCellSource(SourceConfig(soma_uri=str(demo_soma), layer="data")).resolve(other)

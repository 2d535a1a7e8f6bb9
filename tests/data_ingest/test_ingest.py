"""Incremental ingest: append, stable vocabulary, ingest log, idempotent re-run, bad input."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.ingest import ingest_h5ads, log_path, main, read_log
from data_ingest.soma_store import to_census_layout, write_experiment
from data_ingest.source import ALL, SomaCellSource, SourceConfig
from data_ingest.vocab import GeneVocab


def _adata(n, genes, seed):
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.poisson(1.5, (n, len(genes))).astype(np.float32) + 0)
    X[X.getnnz(axis=1) == 0, 0] = 1.0
    obs = pd.DataFrame({"cell_type": rng.choice(["a", "b"], n)}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture
def exp(tmp_path):
    base = _adata(30, [f"G{i}" for i in range(10)], 0)
    uri = write_experiment(tmp_path / "exp", [to_census_layout(base, "ds0", "cell_type", "counts")])
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(10)])
    vocab.save(tmp_path / "vocab.json")
    return uri, tmp_path / "vocab.json"


def test_append_extend_vocab_log_and_noop(exp, tmp_path):
    import tiledbsoma

    uri, vocab_path = exp
    before = GeneVocab.load(vocab_path).to_dict()
    new = _adata(20, ["G3", "G4", "NEW1", "NEW2"], 1)
    f = tmp_path / "new.h5ad"
    new.write_h5ad(f)
    rep = ingest_h5ads(uri, [f], vocab_path=vocab_path)
    assert [e.dataset_id for e in rep.added] == ["new"] and rep.added[0].new_genes == 2
    vocab = GeneVocab.load(vocab_path)
    assert {k: vocab[k] for k in before} == before  # existing ids never change
    assert vocab["NEW1"] == len(before) and vocab["NEW2"] == len(before) + 1
    with tiledbsoma.Experiment.open(str(uri)) as e:
        obs = e.obs.read().concat().to_pandas()
        var = e.ms["RNA"].var.read().concat().to_pandas()
        X = e.ms["RNA"].X["raw"].read().tables().concat()
    assert len(obs) == 50 and (obs[keys.OBS_DATASET] == "new").sum() == 20
    assert obs[keys.SOMA_JOINID].tolist() == list(range(50))  # old cells keep their joinids
    assert set(var[keys.VAR_GENE_NAME]) == {f"G{i}" for i in range(10)} | {"NEW1", "NEW2"}
    assert np.isclose(X["soma_data"].to_numpy().sum(), 30 * 10 * 1.5 + new.X.sum(), rtol=0.1)
    # The appended cells are read with their genes by the source.
    src = SomaCellSource(SourceConfig(soma_uri=str(uri), value_filter="dataset_id == 'new'"))
    res = src.resolve(vocab, ALL)
    assert len(res.joinids) > 0 and res.joinids.min() >= 30
    log = read_log(uri)
    assert len(log) == 1 and log[0]["dataset_id"] == "new" and log[0]["added_at"]
    # Same file again: a no-op (nothing appended, log unchanged), also through the CLI.
    rep2 = ingest_h5ads(uri, [f], vocab_path=vocab_path)
    assert rep2.added == [] and rep2.skipped == [str(f)]
    assert main(["--experiment", str(uri), "--vocab", str(vocab_path), str(f)]) == 0
    assert json.loads(log_path(uri).read_text()) == log
    with tiledbsoma.Experiment.open(str(uri)) as e:
        assert e.obs.count == 50


def test_bad_inputs(exp, tmp_path):
    uri, _ = exp
    dup = _adata(5, ["G1", "G1", "G2"], 2)
    dup.var_names = ["G1", "G1", "G2"]
    frac = _adata(5, ["G1", "G2"], 3)
    frac.X = frac.X * 0.5 + sp.csr_matrix(np.full((5, 2), 0.25, np.float32))
    empty = _adata(5, ["G1", "G2"], 4)
    empty.X = sp.csr_matrix(empty.X.toarray() * np.array([[0], [1], [1], [1], [1]], np.float32))
    cases = {
        "dup": (dup, "duplicate gene names"),
        "frac": (frac, "non-integer values"),
        "empty": (empty, "1 cells have no expressed genes"),
    }
    for name, (adata, msg) in cases.items():
        f = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(f)
        with pytest.raises(ValueError, match=msg):
            ingest_h5ads(uri, [f])
    assert read_log(uri) == []
    ok = tmp_path / "ds0.h5ad"
    _adata(5, ["G1"], 5).write_h5ad(ok)
    with pytest.raises(ValueError, match="already in"):
        ingest_h5ads(uri, [ok])

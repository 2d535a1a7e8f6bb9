"""Synthetic CITE-seq: RNA from a census's planted truth, proteins that follow their target genes' programs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_ingest import keys
from data_ingest.synth import multiome as ms
from data_ingest.synth.census import CensusSynthConfig, CensusTruth

CENSUS = CensusSynthConfig(
    n_cells=400,
    n_genes=600,
    n_datasets=3,
    n_tissues=1,
    n_cell_types=4,
    types_per_tissue=4,
    markers_per_type=10,
    n_modules=6,
    genes_per_module=10,
    modules_per_type=2,
)
CFG = ms.MultiomeSynthConfig(n_cells=300, n_batches=3, n_proteins=8)


@pytest.fixture(scope="module")
def cite():
    return ms.make_multiome(CFG, CENSUS)


def test_layout_and_determinism(cite):
    truth = CensusTruth(CENSUS)
    assert cite.shape == (300, 600 + 8)
    rna_names = list(cite.var_names[:600])
    assert rna_names == truth.gene_names  # the census's genes: a model pretrained on it knows them
    prot = cite.var_names[600:]
    assert all(p.startswith(ms.PROTEIN_PREFIX) for p in prot)
    assert set(cite.uns["protein_targets"].values()) <= set(truth.gene_names)
    mod = ms.modality_of_features(cite.var)
    assert (mod[:600] == keys.MODALITY_RNA).all() and (mod[600:] == keys.MODALITY_PROTEIN).all()
    # Without the feature_type column the PROT_ prefix decides.
    assert (ms.modality_of_features(cite.var.drop(columns=ms.VAR_FEATURE_TYPE)) == mod).all()
    assert cite.obs[keys.OBS_DATASET].nunique() == 3
    assert cite.obs[keys.OBS_CELL_TYPE].nunique() >= 3
    X = cite.X.toarray()
    assert (X >= 0).all() and np.array_equal(X, np.round(X))
    again = ms.make_multiome(CFG, CENSUS)
    assert (again.X != cite.X).nnz == 0
    other = ms.make_multiome(
        ms.MultiomeSynthConfig(n_cells=300, n_batches=3, n_proteins=8, seed=1), CENSUS
    )
    assert (other.X != cite.X).nnz > 0


def test_proteins_follow_their_genes_programs(cite):
    """A protein targeting type t's marker is highest in type t, and its gene is up there too; proteins are
    dense (ADT-like) and their scale differs from the RNA's."""
    truth = CensusTruth(CENSUS)
    P = cite[:, cite.var_names.str.startswith(ms.PROTEIN_PREFIX)].X.toarray()
    R = cite[:, :600].X.toarray()
    assert (P > 0).mean() > 0.95
    assert (R > 0).mean() < 0.6
    assert P.sum(1).mean() > 5 * np.median(R[R > 0])
    types = cite.obs[keys.OBS_CELL_TYPE].to_numpy()
    logp = np.log1p(P / P.sum(1, keepdims=True) * 1e3)
    logr = np.log1p(R / R.sum(1, keepdims=True) * 1e4)
    checked = 0
    for j, (name, gene) in enumerate(cite.uns["protein_targets"].items()):
        g = truth.gene_names.index(gene)
        marker_of = [t for t in range(len(truth.type_names)) if g in truth.markers[t]]
        if not marker_of or truth.type_names[marker_of[0]] not in set(types):
            continue
        tname = truth.type_names[marker_of[0]]
        by_type = pd.Series(logp[:, j]).groupby(types).mean()
        assert by_type.idxmax() == tname, (name, by_type)
        rna_by_type = pd.Series(logr[:, g]).groupby(types).mean()
        assert rna_by_type[tname] > rna_by_type.drop(tname).mean()
        checked += 1
    assert checked >= 3


def test_config_errors_and_ground_truth(tmp_path):
    with pytest.raises(ValueError, match="n_batches"):
        ms.make_multiome(ms.MultiomeSynthConfig(n_cells=100, n_batches=5), CENSUS)
    with pytest.raises(ValueError, match="fewer than"):
        ms.MultiomeSynthConfig(n_cells=2, n_batches=3)
    with pytest.raises(FileNotFoundError, match="ground_truth"):
        ms.census_config_from_truth(tmp_path / "nope.json")
    path = tmp_path / "census.ground_truth.json"
    import dataclasses

    path.write_text(json.dumps({"config": dataclasses.asdict(CENSUS)}))
    assert ms.census_config_from_truth(path) == CENSUS
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"modules": []}))
    with pytest.raises(ValueError, match="no `config`"):
        ms.census_config_from_truth(bad)


def test_cli_writes_h5ad(tmp_path):
    import dataclasses

    import anndata as ad

    truth_path = tmp_path / "c.ground_truth.json"
    truth_path.write_text(json.dumps({"config": dataclasses.asdict(CENSUS)}))
    out = tmp_path / "cite.h5ad"
    rc = ms.main(
        ["--out", str(out), "--ground-truth", str(truth_path), "--cells", "60", "--batches", "2",
         "--proteins", "5"]
    )  # fmt: skip
    assert rc == 0
    back = ad.read_h5ad(out)
    assert back.shape == (60, 605)
    assert list(back.var[ms.VAR_FEATURE_TYPE].unique()) == [ms.FEATURE_RNA, ms.FEATURE_PROTEIN]

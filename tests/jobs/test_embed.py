"""`python -m jobs.embed` on the tiny pretrained model: output, and bad input with exit code 2."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_ingest.demo_data import load_pbmc
from jobs import embed
from scgpt_dist.inference import EMBEDDING_KEY


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "jobs.embed", *args], capture_output=True, text=True, timeout=300
    )


def test_embed_writes_normalized_embeddings(pretrained, tmp_path):
    pbmc = load_pbmc()[:60].copy()
    src = tmp_path / "cells.h5ad"
    pbmc.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    assert (
        embed.main(
            [
                "--checkpoint",
                pretrained["second"]["model_dir"],
                "--h5ad",
                str(src),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    emb = ad.read_h5ad(out).obsm[EMBEDDING_KEY]
    assert emb.shape == (60, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert np.std(emb, axis=0).mean() > 1e-3  # cells get different embeddings


def test_embed_bad_inputs(pretrained, tmp_path):
    model = pretrained["second"]["model_dir"]
    res = _run("--checkpoint", model, "--h5ad", str(tmp_path / "missing.h5ad"))
    assert res.returncode == 2 and "no .h5ad file" in res.stderr

    corrupt = tmp_path / "corrupt.h5ad"
    corrupt.write_bytes(b"not an hdf5 file")
    res = _run("--checkpoint", model, "--h5ad", str(corrupt))
    assert res.returncode == 2 and "not a readable .h5ad" in res.stderr

    unknown = ad.AnnData(
        X=sp.csr_matrix(np.ones((4, 3), np.float32)),
        var=pd.DataFrame(index=["FOO1", "FOO2", "FOO3"]),
    )
    path = tmp_path / "unknown.h5ad"
    unknown.write_h5ad(path)
    res = _run("--checkpoint", model, "--h5ad", str(path))
    assert res.returncode == 2 and "none of the 3 genes are in the model's vocabulary" in res.stderr
    assert not (tmp_path / "unknown_scgpt.h5ad").exists()

    res = _run("--checkpoint", str(tmp_path), "--h5ad", str(path))
    assert res.returncode == 2 and "lacks model.safetensors" in res.stderr

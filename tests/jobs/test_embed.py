"""`python -m jobs.embed` on the tiny pretrained model: output, and bad input with exit code 2."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_ingest.demo_data import load_pbmc
from jobs import embed
from scgpt_dist.inference import EMBEDDING_KEY

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` skips it


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "jobs.embed", *args], capture_output=True, text=True, timeout=300
    )


def _run_here(capsys, *args) -> tuple[int, str]:
    """What `python -m jobs.embed <args>` does (its `__main__` is `run_main(main)`), in this process:
    (exit code, stderr). The CLI itself is run as a process once, in test_embed_bad_inputs."""
    from jobs._cli import run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: embed.main(list(args)))
    return exit_.value.code, capsys.readouterr().err


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


def test_embed_bad_inputs(pretrained, tmp_path, capsys):
    model = pretrained["second"]["model_dir"]
    res = _run("--checkpoint", model, "--h5ad", str(tmp_path / "missing.h5ad"))
    assert res.returncode == 2 and "no .h5ad file" in res.stderr

    corrupt = tmp_path / "corrupt.h5ad"
    corrupt.write_bytes(b"not an hdf5 file")
    code, err = _run_here(capsys, "--checkpoint", model, "--h5ad", str(corrupt))
    assert code == 2 and "not a readable .h5ad" in err

    unknown = ad.AnnData(
        X=sp.csr_matrix(np.ones((4, 3), np.float32)),
        var=pd.DataFrame(index=["FOO1", "FOO2", "FOO3"]),
    )
    path = tmp_path / "unknown.h5ad"
    unknown.write_h5ad(path)
    code, err = _run_here(capsys, "--checkpoint", model, "--h5ad", str(path))
    assert code == 2 and "none of the 3 genes are in the model's vocabulary" in err
    assert not (tmp_path / "unknown_scgpt.h5ad").exists()

    code, err = _run_here(capsys, "--checkpoint", str(tmp_path), "--h5ad", str(path))
    assert code == 2 and "lacks model.safetensors" in err

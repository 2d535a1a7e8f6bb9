"""Every `python -m data_ingest.*` entry point answers bad input with one `error:` line naming the problem
and the fix, exit code 2, no traceback, and leaves nothing half-written."""

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from data_ingest import ingest
from data_ingest.cli import EXIT_USAGE, run_main
from data_ingest.ingest import read_log
from data_ingest.synth import census as synth
from data_ingest.synth import splat
from tests.conftest import REPO
from tests.data_ingest.test_ingest import _adata, exp  # noqa: F401  (fixture)


def _fails(capsys, main, argv: list[str], expect: str) -> str:
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == EXIT_USAGE, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expect in err, err
    return err


def test_ingest_bad_inputs_one_line_exit_2(capsys, exp, tmp_path):  # noqa: F811
    uri, _ = exp
    corrupt = tmp_path / "corrupt.h5ad"
    corrupt.write_bytes(b"not an hdf5 file" * 10)
    frac = _adata(5, ["G1", "G2"], 3)
    frac.X = frac.X * 0.5 + sp.csr_matrix(np.full((5, 2), 0.25, np.float32))
    frac.write_h5ad(tmp_path / "frac.h5ad")
    dup = _adata(5, ["G1", "G1", "G2"], 2)
    dup.var_names = ["G1", "G1", "G2"]
    dup.write_h5ad(tmp_path / "dup.h5ad")
    empty = _adata(5, ["G1", "G2"], 4)
    empty.X = sp.csr_matrix(empty.X.toarray() * np.array([[0], [1], [1], [1], [1]], np.float32))
    empty.write_h5ad(tmp_path / "empty.h5ad")
    ok = tmp_path / "ok.h5ad"
    _adata(6, ["G1", "G3"], 5).write_h5ad(ok)

    missing = tmp_path / "nowhere"
    _fails(capsys, ingest.main, ["--experiment", str(missing), str(ok)], "--create")
    assert not missing.exists()
    _fails(capsys, ingest.main, ["--experiment", str(uri), str(tmp_path / "x.h5ad")], "no .h5ad")
    _fails(capsys, ingest.main, ["--experiment", str(uri), str(corrupt)], "re-export it")
    _fails(
        capsys, ingest.main, ["--experiment", str(uri), str(tmp_path / "frac.h5ad")], "raw counts"
    )
    _fails(capsys, ingest.main, ["--experiment", str(uri), str(tmp_path / "dup.h5ad")], "duplicate")
    _fails(
        capsys,
        ingest.main,
        ["--experiment", str(uri), str(tmp_path / "empty.h5ad")],
        "filter_cells",
    )
    assert read_log(uri) == []  # nothing was appended

    # --create makes a new experiment from the files; the first file seeds it.
    made = tmp_path / "made"
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: ingest.main(["--experiment", str(made), "--create", str(ok)]))
    assert stop.value.code == 0
    assert [e["dataset_id"] for e in read_log(made)] == ["ok"]


def test_generators_bad_arguments(capsys, tmp_path):
    _fails(capsys, synth.main, ["--out", str(tmp_path / "s"), "--genes", "500"], "add genes")
    assert not (tmp_path / "s").exists()
    (tmp_path / "taken").mkdir()
    _fails(capsys, synth.main, ["--out", str(tmp_path / "taken")], "overwrite")
    with pytest.raises(SystemExit) as stop:  # argparse's own usage error: also exit 2, no traceback
        run_main(lambda: splat.main(["--out", str(tmp_path / "p"), "--cells", "0"]))
    assert stop.value.code == EXIT_USAGE and not (tmp_path / "p").exists()


def test_python_m_entry_point_has_no_traceback(tmp_path):
    """The real `python -m` path, as a user runs it."""
    res = subprocess.run(
        [sys.executable, "-m", "data_ingest.ingest", "--experiment", str(tmp_path / "x"), "a.h5ad"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == EXIT_USAGE
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: no .h5ad file at a.h5ad")

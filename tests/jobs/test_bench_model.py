"""`python -m jobs.bench model` on a tiny config: both models run on the same batches and are tabulated."""

import pytest

from jobs.bench import model as bench_model
from scgpt_dist import interchange


def test_bench_model_tiny(capsys):
    try:
        interchange.load_reference_module()
    except ImportError:
        pytest.skip("reference scGPT not installed (make install adds it)")
    argv = "--layers 1 --d-model 16 --heads 2 --d-hid 16 --genes 24 --batch 2 --steps 1 --warmup 1"
    assert bench_model.main(argv.split()) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("reference", "ours"))]
    assert [(" ".join(r[:-5]), r[-5]) for r in rows] == [
        (model, shape)
        for shape in ("full", "variable")
        for model in ("reference", "ours (sdpa)", "ours (varlen)")
    ]
    assert all(float(r[-4]) > 0 for r in rows)  # tokens/s
    assert rows[0][-1] == "1.00x"

"""`python -m jobs.bench model` on a tiny config: both models run on the same batches and are tabulated."""

import pytest

from jobs.bench import model as bench_model
from scgpt_dist.model import reference


def test_bench_model_tiny(capsys):
    try:
        reference.load_reference_module()
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


def test_bench_model_gpu_mode_dry_run_on_cpu(capsys):
    """The GPU mode's path (whole-human preset, flash backend, MFU column) at a tiny size in fp32 on CPU."""
    try:
        reference.load_reference_module()
    except ImportError:
        pytest.skip("reference scGPT not installed (make install adds it)")
    argv = (
        "--preset whole-human --layers 1 --d-model 16 --heads 2 --d-hid 16 --genes 24 --batch 2 "
        "--steps 1 --warmup 1 --attention flash --peak-tflops 1e-7 --shapes variable"
    )
    assert bench_model.main(argv.split()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "fp32" in lines[0] and lines[1].split()[-1] == "MFU"
    rows = [line.split() for line in lines if line.startswith(("reference", "ours"))]
    assert [" ".join(r[:-6]) for r in rows] == ["reference", "ours (flash)"]
    assert all(r[-1].endswith("%") and float(r[-1][:-1]) > 0 for r in rows)

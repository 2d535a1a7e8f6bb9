"""The learning lab on data where the answer is exact: a masked gene's count is a fixed function of the cell
type and the gene set is the same in every cell, so only a model that reads the visible values can predict
it. The recipe must get close to zero error within a few hundred steps (single process, ~15 s)."""

import json

import pytest

from jobs.bench import lab


@pytest.mark.slow
def test_the_recipe_reads_context_on_exact_data(tmp_path):
    out = tmp_path / "lab.json"
    argv = [
        "--data", "exact", "--cells", "600", "--genes", "100", "--types", "4", "--datasets", "2",
        "--steps", "300", "--eval-every", "150", "--d", "32", "--layers", "2", "--heads", "2",
        "--eval-cells", "120", "--out", str(out),
    ]  # fmt: skip
    assert lab.main(argv) == 0
    r = json.loads(out.read_text())
    base, last = r["baselines"], r["history"][-1]
    assert base["per_gene_type_mean"] == 0.0  # the planted answer is exact
    assert last["step"] == 300
    assert last["gep"] < 0.1 * base["per_gene_mean"]  # context-free guessing is ~150 squared bins
    assert r["history"][0]["gep"] > base["per_gene_mean"]  # at initialisation it is worse than that


def test_thinned_count_views_add_a_contrast_term(tmp_path):
    out = tmp_path / "lab.json"
    argv = [
        "--data", "exact", "--cells", "400", "--genes", "100", "--types", "3", "--datasets", "2",
        "--steps", "4", "--eval-every", "4", "--d", "16", "--layers", "1", "--heads", "2",
        "--eval-cells", "80", "--batch", "16", "--thin", "0.5", "--out", str(out),
    ]  # fmt: skip
    assert lab.main(argv) == 0
    last = json.loads(out.read_text())["history"][-1]
    # Symmetric InfoNCE over 16 cells: about ln 16 = 2.77 before any learning, never negative.
    assert 0.0 < last["train_thin"] < 4.0


def test_thinned_views_through_the_records_as_the_pipeline_makes_them(tmp_path):
    out = tmp_path / "lab.json"
    argv = [
        "--data", "exact", "--cells", "400", "--genes", "100", "--types", "3", "--datasets", "2",
        "--steps", "4", "--eval-every", "4", "--d", "16", "--layers", "1", "--heads", "2",
        "--eval-cells", "80", "--batch", "16", "--view", "0.5",
        "--objectives", '{"cce": 1.0, "cce_view": "thinned", "cce_temp": 0.1, "gep": 0.02}',
        "--out", str(out),
    ]  # fmt: skip
    assert lab.main(argv) == 0
    last = json.loads(out.read_text())["history"][-1]
    assert 0.0 < last["train_cce"] < 4.0 and last["train_gep"] > 0.0

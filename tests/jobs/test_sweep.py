"""jobs.sweep: a 2-cell sweep of `jobs.finetune zeroshot` on a really pretrained model, run as Ray tasks with
MLflow child runs under one parent; a re-run reuses the finished cells and runs nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from jobs.sweep import (
    CELLS_DIR,
    CSV_FILE,
    DONE_FILE,
    PARENT_RUN_TAG,
    JobSpec,
    SweepConfig,
    cell_key,
    expand_cells,
    finetune_config,
    load_sweep_config,
    run_sweep,
)
from scgpt_dist.config import ConfigError
from tests.conftest import REPO


def _zeroshot_sweep(model_dir: Path, out: Path) -> SweepConfig:
    return SweepConfig(
        name="zeroshot-k",
        output_dir=str(out),
        job=JobSpec(
            kind="finetune",
            task="zeroshot",
            args=[
                "--checkpoint",
                str(model_dir),
                "--data",
                "pbmc68k_reduced",
                "--max-cells",
                "150",
                "--no-scvi",
                "--no-umap",
                "--threads",
                "1",
            ],
        ),
        grid={"k": [3, 15]},
        concurrency=2,
        num_cpus=1,
        metrics=["scgpt_zeroshot/knn_accuracy", "hvg_pca50/knn_accuracy"],
    )


@pytest.mark.slow
def test_sweep_runs_cells_as_child_runs_and_resumes(ray_local, pretrained, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _zeroshot_sweep(Path(pretrained["second"]["model_dir"]), tmp_path / "sweep")
    first = run_sweep(cfg)
    assert first.failed == {} and len(first.ran) == 2 and first.reused == []

    client = MlflowClient(first.tracking_uri)
    parent = client.get_run(first.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.{PARENT_RUN_TAG} = '{parent.info.run_id}'"
    )
    assert sorted(r.data.params["k"] for r in children) == ["15", "3"]
    assert all(r.info.status == "FINISHED" for r in children)
    for row in first.rows:
        run = client.get_run(row["run_id"])
        assert run.data.tags[PARENT_RUN_TAG] == first.parent_run_id
        # The table holds what the child run logged.
        assert row["scgpt_zeroshot/knn_accuracy"] == pytest.approx(
            run.data.metrics["scgpt_zeroshot/knn_accuracy"]
        )
        assert 0.0 <= row["scgpt_zeroshot/knn_accuracy"] <= 1.0
    assert {r["k"] for r in first.rows} == {3, 15}

    # One table: markdown + CSV, also logged to the parent run.
    report = first.report.read_text()
    assert (
        "| cell | k | status | scgpt_zeroshot/knn_accuracy | hvg_pca50/knn_accuracy | run_id |"
        in report
    )
    with open(first.report.parent / CSV_FILE) as f:
        rows = list(csv.DictReader(f))
    assert [r["k"] for r in rows] == ["3", "15"] and {r["status"] for r in rows} == {"ran"}
    artifacts = {a.path for a in client.list_artifacts(first.parent_run_id, "report")}
    assert {"report/report.md", f"report/{CSV_FILE}"} <= artifacts

    # Re-run: every cell is reused from its done marker; nothing runs, no new child run appears.
    markers = {
        k: (tmp_path / "sweep" / CELLS_DIR / k / DONE_FILE).stat().st_mtime_ns for k in first.ran
    }
    second = run_sweep(cfg)
    assert second.ran == [] and sorted(second.reused) == sorted(first.ran)
    assert second.parent_run_id == first.parent_run_id
    assert {r["status"] for r in second.rows} == {"reused"}
    assert [r["run_id"] for r in second.rows] == [r["run_id"] for r in first.rows]
    for k, mtime in markers.items():
        assert (tmp_path / "sweep" / CELLS_DIR / k / DONE_FILE).stat().st_mtime_ns == mtime
    after = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.{PARENT_RUN_TAG} = '{parent.info.run_id}'"
    )
    assert len(after) == 2

    # A partially finished sweep: drop one marker, only that cell runs again.
    lost = first.ran[0]
    (tmp_path / "sweep" / CELLS_DIR / lost / DONE_FILE).unlink()
    third = run_sweep(cfg)
    assert third.ran == [lost] and third.reused == [first.ran[1]]
    done = json.loads((tmp_path / "sweep" / CELLS_DIR / lost / DONE_FILE).read_text())
    assert done["key"] == lost and done["params"] in ({"k": 3}, {"k": 15})


def test_cells_are_keyed_by_job_and_parameters():
    job = JobSpec(kind="pretrain", config="jobs/configs/tiny.yaml")
    assert cell_key(job, {"a": 1, "b": 2}) == cell_key(job, {"b": 2, "a": 1})
    assert cell_key(job, {"a": 1}) != cell_key(job, {"a": 2})
    other = JobSpec(kind="pretrain", config="jobs/configs/tiny.yaml", overrides=["train.lr=1"])
    assert cell_key(job, {"a": 1}) != cell_key(other, {"a": 1})
    cfg = SweepConfig(job=job, grid={"x": [1, 2], "y": ["a", "b", "c"]}, cells=[{"x": 1, "y": "a"}])
    cells = expand_cells(cfg)
    assert len(cells) == 6  # the listed cell duplicates a grid cell
    assert [p for _, p in cells][:2] == [{"x": 1, "y": "a"}, {"x": 1, "y": "b"}]


def test_finetune_config_sets_cell_params_and_mlflow_nesting(tmp_path):
    from jobs.sweep import CellContext

    job = JobSpec(kind="finetune", task="annotation", args=["--data", "pbmc68k_reduced"])
    ctx = CellContext(
        "abc",
        {"lr": 0.001, "n_hvg": "500", "no_scratch": True},
        tmp_path,
        "sqlite:///x.db",
        "e",
        "P",
    )
    cfg = finetune_config(job, ctx)
    assert cfg.data == "pbmc68k_reduced" and cfg.out == str(tmp_path / "out")
    assert (cfg.lr, cfg.n_hvg, cfg.no_scratch) == (0.001, 500, True)  # typed, not strings
    assert (cfg.parent_run_id, cfg.experiment, cfg.tracking_uri) == ("P", "e", "sqlite:///x.db")
    bad = CellContext("abc", {"n_hvgs": 5}, tmp_path, "sqlite:///x.db", "e", "P")
    with pytest.raises(ValueError, match="no setting 'n_hvgs'; did you mean 'n_hvg'"):
        finetune_config(job, bad)
    bad = CellContext("abc", {"no_scratch": "yes"}, tmp_path, "sqlite:///x.db", "e", "P")
    with pytest.raises(ValueError, match="no_scratch is a switch"):
        finetune_config(job, bad)


@pytest.mark.parametrize("name", ["sweep_annotation.yaml", "sweep_cpu.yaml"])
def test_shipped_sweep_presets_load(name):
    cfg = load_sweep_config(REPO / "jobs" / "configs" / name)
    assert len(expand_cells(cfg)) >= 2
    if cfg.job.kind == "pretrain":
        from scgpt_dist.config import load_config

        assert (REPO / cfg.job.config).is_file()
        for _, params in expand_cells(cfg):
            load_config(REPO / cfg.job.config, [f"{k}={v}" for k, v in params.items()])


def test_bad_sweep_configs_say_what_to_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\njob: {kind: finetune, task: zeroshot}\ngrids: {k: [1]}\n")
    with pytest.raises(ConfigError, match="unknown config key 'grids'; did you mean 'grid'"):
        load_sweep_config(bad)
    bad.write_text("job: {kind: finetune, task: zeroshot}\ngrid: {k: 5}\n")
    with pytest.raises(ConfigError, match=r"grid.k must be a non-empty list"):
        load_sweep_config(bad)
    bad.write_text("job: {kind: pretrain}\ngrid: {train.lr: [1]}\n")
    with pytest.raises(ConfigError, match="needs job.config"):
        load_sweep_config(bad)
    bad.write_text("job: {kind: finetune, task: zeroshot, args: [--out, x]}\ngrid: {k: [1]}\n")
    with pytest.raises(ConfigError, match="the sweep sets those per cell"):
        load_sweep_config(bad)
    bad.write_text(
        "job: {kind: finetune, task: zeroshot}\ngrid: {k: [1]}\nmlflow: {registered_model: m}\n"
    )
    with pytest.raises(ConfigError, match="a sweep registers no model"):
        load_sweep_config(bad)
    with pytest.raises(ConfigError, match="no sweep config"):
        load_sweep_config(tmp_path / "missing.yaml")

"""A real 2-worker Ray Train + DeepSpeed ZeRO-2 run (the session's `pretrained` fixture): loss, resume,
checkpoints, consolidation and the MLflow run."""

import json
import shutil
import subprocess
from importlib import metadata

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from data_ingest import keys
from scgpt_dist.config import load_config
from scgpt_dist.train.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_consolidated,
    validate_checkpoint,
)
from scgpt_dist.train.lineage import GIT_COMMIT_TAG, GIT_DIRTY_TAG
from scgpt_dist.train.module import lr_lambda
from tests.conftest import REPO, TINY_CONFIG


def _history(pretrained, key):
    client = MlflowClient(pretrained["second"]["tracking_uri"])
    return client.get_metric_history(pretrained["second"]["run_id"], key)


def test_first_invocation_stopped_with_a_complete_checkpoint(pretrained):
    first = pretrained["first"]
    assert first["step"] == 6 and "model_dir" not in first
    assert pretrained["ckpts_after_first"] == ["step_00000006"]


def test_resume_continues_the_same_run(pretrained):
    second = pretrained["second"]
    assert second["step"] == 12
    # Same MLflow run, continued; steps logged once each, no gap and no duplicate across the restart.
    assert second["run_id"] == pretrained["run_id_after_first"] == pretrained["first"]["run_id"]
    steps = [m.step for m in _history(pretrained, "loss")]
    assert steps == [2, 4, 6, 8, 10, 12]
    # The LR schedule (optimizer + scheduler state) continued where it stopped.
    cfg = load_config(TINY_CONFIG, pretrained["overrides"])
    lrs = {m.step: m.value for m in _history(pretrained, "lr")}
    assert lrs[8] == pytest.approx(cfg.train.lr * lr_lambda(cfg.train)(8), rel=1e-6)
    # Counters carried in the checkpoint.
    meta = json.loads(
        (pretrained["output_dir"] / "checkpoints/step_00000012/meta.json").read_text()
    )
    assert meta["step"] == 12 and meta["world_size"] == 2 and meta["zero_stage"] == 2
    first_meta = json.loads(
        (pretrained["output_dir"] / "checkpoints/step_00000006/meta.json").read_text()
    )
    assert meta["tokens_seen"] > first_meta["tokens_seen"] > 0


def test_loss_decreases_without_a_jump_at_resume(pretrained):
    loss = {m.step: m.value for m in _history(pretrained, "loss")}
    assert loss[12] < 0.8 * loss[2]
    # After resuming at step 6 the loss picks up where it was, not back at the untrained level.
    assert loss[8] < 0.9 * loss[2] and loss[8] < 1.3 * loss[6]
    parts = {m.step: m.value for m in _history(pretrained, "loss_gep")}
    # One batch's GEP loss is noisy (it depends on which cells the batch drew): compare windows.
    steps = sorted(parts)
    assert np.mean([parts[s] for s in steps[-2:]]) < np.mean([parts[s] for s in steps[:2]]), parts


def test_mlflow_run_contents(pretrained):
    client = MlflowClient(pretrained["second"]["tracking_uri"])
    run = client.get_run(pretrained["second"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2"
    assert run.data.params["model.d_model"] == "32"
    assert run.data.tags["resumed_from"].endswith("step_00000006")
    assert run.data.tags["checkpoint.latest"].endswith("step_00000012")
    for key in ("loss", "loss_gep", "loss_gepc", "lr", "grad_norm", "tokens_per_s", "cells_per_s"):
        assert key in run.data.metrics, key
    assert run.data.metrics["tokens_per_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in model_files
    # The consolidated model is registered, tagged with the data it was trained on.
    (version,) = client.search_model_versions("name='scgpt-tiny'")
    assert version.run_id == run.info.run_id and str(version.version) == "1"
    assert version.tags["step"] == "12" and version.tags["soma_uri"].endswith("demo")
    assert pretrained["second"]["model_version"] == "1"


def test_mlflow_lineage(pretrained):
    """Which code and which cells made the run: git commit, package versions, a dataset input."""
    client = MlflowClient(pretrained["second"]["tracking_uri"])
    run = client.get_run(pretrained["second"]["run_id"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if head.returncode == 0:  # a git checkout (CI's clone is one)
        assert run.data.tags[GIT_COMMIT_TAG] == head.stdout.strip()
        assert run.data.tags[GIT_DIRTY_TAG] in ("true", "false")
    for name in ("torch", "ray", "deepspeed", "tiledbsoma", "cellxgene-census"):
        assert run.data.tags[f"version.{name}"] == metadata.version(name)
    (data_input,) = run.inputs.dataset_inputs  # logged once, not again by the resumed invocation
    source = json.loads(data_input.dataset.source)
    profile = json.loads(data_input.dataset.profile)
    assert source["uri"].endswith("demo") and source["split"] == "train"
    n_train = int(version_tags(client)["train_cells"])
    assert profile["n_cells"] == n_train > 0
    assert data_input.dataset.digest == version_tags(client)["train_cells_digest"]
    assert {t.key: t.value for t in data_input.tags}["mlflow.data.context"] == "training"


def version_tags(client) -> dict:
    (version,) = client.search_model_versions("name='scgpt-tiny'")
    return version.tags


def test_sharded_checkpoint_layout_and_partial_detection(pretrained, tmp_path):
    ckpt = pretrained["output_dir"] / "checkpoints" / "step_00000012"
    assert sorted(p.name for p in ckpt.glob("manifest_rank_*.json")) == [
        "manifest_rank_0.json",
        "manifest_rank_1.json",
    ]
    shards = sorted(p.name for p in (ckpt / "ds").iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    validate_checkpoint(ckpt)
    # A copy missing rank 1's shard is detected, and discovery falls back to the previous good one.
    work = tmp_path / "out"
    shutil.copytree(pretrained["output_dir"] / "checkpoints", work / "checkpoints")
    (work / "checkpoints/step_00000012/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="written by rank 1.*shard is missing"):
        validate_checkpoint(work / "checkpoints/step_00000012")
    assert find_latest_checkpoint(work).name == "step_00000006"
    # Flipped bytes (same size) fail the checksum; a truncated file fails the size check.
    shard = work / "checkpoints/step_00000006/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[-10:] = bytes(10)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        validate_checkpoint(work / "checkpoints/step_00000006")
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        validate_checkpoint(work / "checkpoints/step_00000006")
    (work / "checkpoints/step_00000006/meta.json").unlink()
    assert find_latest_checkpoint(work) is None


def test_consolidated_model_matches_checkpoint(pretrained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    loaded = load_consolidated(pretrained["second"]["model_dir"])
    ckpt = pretrained["output_dir"] / "checkpoints" / "step_00000012"
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    state = loaded.model.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v)
    assert (
        loaded.vocab.fingerprint()
        == json.loads((ckpt / keys.META_FILE).read_text())["vocab_fingerprint"]
    )
    assert np.isfinite(sum(float(v.sum()) for v in state.values()))


@pytest.mark.slow
def test_resume_is_exact(pretrained, tmp_path):
    """Stopped at step 6 and resumed must equal one uninterrupted run: same data order, masks, optimizer and
    schedule, so the same losses and the same final weights."""
    from scgpt_dist.train.driver import run_pretraining

    overrides = [o for o in pretrained["overrides"] if not o.startswith(("output_dir", "mlflow"))]
    straight = run_pretraining(
        load_config(
            TINY_CONFIG,
            overrides
            + [
                f"output_dir={tmp_path / 'run'}",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            ],
        )
    )
    a = load_consolidated(straight["model_dir"]).model.state_dict()
    b = load_consolidated(pretrained["second"]["model_dir"]).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    straight_loss = {
        m.step: m.value
        for m in MlflowClient(straight["tracking_uri"]).get_metric_history(
            straight["run_id"], "loss"
        )
    }
    resumed_loss = {m.step: m.value for m in _history(pretrained, "loss")}
    assert straight_loss.keys() == resumed_loss.keys()
    for step, value in straight_loss.items():
        assert value == pytest.approx(resumed_loss[step], rel=1e-5)
    # The same cells at every log step, before and after the resume (a digest of their soma_joinids).
    straight_cells = {
        m.step: m.value
        for m in MlflowClient(straight["tracking_uri"]).get_metric_history(
            straight["run_id"], "cells_digest"
        )
    }
    resumed_cells = {m.step: m.value for m in _history(pretrained, "cells_digest")}
    assert straight_cells == resumed_cells and len(set(straight_cells.values())) > 1


def test_retention_keeps_newest_and_best(pretrained, tmp_path):
    from scgpt_dist.train.checkpoint import prune_checkpoints

    root = tmp_path / "out" / "checkpoints"
    for step, loss in ((2, 5.0), (4, 1.0), (6, 3.0), (8, 4.0), (10, 2.0)):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step, "loss": loss}))
    gone = prune_checkpoints(tmp_path / "out", keep=2)
    assert sorted(p.name for p in gone) == ["step_00000002", "step_00000006"]
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000004",
        "step_00000008",
        "step_00000010",
    ]
    prune_checkpoints(tmp_path / "out", keep=2, keep_best=False)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000008", "step_00000010"]
    # Real checkpoints record the window loss used for "best".
    meta = json.loads(
        (pretrained["output_dir"] / "checkpoints/step_00000012/meta.json").read_text()
    )
    loss = {m.step: m.value for m in _history(pretrained, "loss")}
    assert meta["loss"] == pytest.approx(loss[12])


def test_cells_digest_is_a_set_digest():
    from scgpt_dist.train.loop import DIGEST_MOD, cells_digest

    a = cells_digest(torch.tensor([5, 17, 123456789]))
    assert a == cells_digest(torch.tensor([123456789, 5, 17]))  # order-free
    assert a != cells_digest(torch.tensor([5, 17, 123456788]))  # another cell, another digest
    assert 0 <= a < DIGEST_MOD
    both = (
        cells_digest(torch.tensor([5])) + cells_digest(torch.tensor([17, 123456789]))
    ) % DIGEST_MOD
    assert both == a  # summed over ranks and steps

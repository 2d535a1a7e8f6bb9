"""Checkpoints on an object store (`train.storage_path=s3://...`), against a real S3-protocol server: moto's
ThreadedMotoServer on 127.0.0.1, spoken to over HTTP by pyarrow (ours and Ray Train's) and boto3.

The S3 settings live only in this test process's environment (monkeypatch); the session's Ray cluster
(`ray_local`) was started before, so Ray Train's controller and worker processes do not have them. They
reach the object store through the `Store` the driver resolves and hands over (see scgpt_dist.train.storage),
which is what is tested.

moto 5.2.1 answers CompleteMultipartUpload with the wrong XML root (getmoto/moto#10055, fixed later), which
pyarrow rejects; objects under one upload part (10 MiB in pyarrow) go up as one PutObject
(`allow_delayed_open`), and the tiny model's shards are a few hundred kB, so no multipart upload happens here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from data_ingest import keys
from scgpt_dist.config import load_config
from scgpt_dist.train.checkpoint import (
    CheckpointError,
    consolidate,
    find_latest_checkpoint,
    load_consolidated,
    prune_checkpoints,
    validate_checkpoint,
)
from scgpt_dist.train.storage import Store, resolve, upload_dir
from tests.conftest import TINY_CONFIG

BUCKET = "scgpt-ckpt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """The moto server, stoppable and restartable on its port (moto keeps the buckets in process)."""

    def __init__(self):
        self.port = _free_port()
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def s3_server():
    server = _Server()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture
def s3(monkeypatch, s3_server):
    """A bucket on a moto S3 server on loopback; AWS_* in this process point at it."""
    port = s3_server.port
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never look for an instance-metadata service
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _steps(client, prefix: str) -> list[str]:
    return sorted({k[len(prefix) :].split("/")[0] for k in _keys(client, prefix)} - {""})


def test_storage_layer_on_s3(s3, tmp_path):
    """Listing, reading, sizes, checksums, retention and deletion behave on S3 as on local disk."""
    for step, loss in ((2, 5.0), (4, 1.0), (6, 3.0), (8, 4.0), (10, 2.0)):
        meta = json.dumps({"step": step, "loss": loss, "world_size": 1})
        s3.put_object(Bucket=BUCKET, Key=f"r/checkpoints/step_{step:08d}/meta.json", Body=meta)
    s3.put_object(Bucket=BUCKET, Key="r/checkpoints/.validate_storage_marker", Body=b"")
    root = resolve(f"s3://{BUCKET}/r") / "checkpoints"
    meta4 = json.dumps({"step": 4, "loss": 1.0, "world_size": 1}).encode()
    assert root.uri == f"s3://{BUCKET}/r/checkpoints" and root.path == f"{BUCKET}/r/checkpoints"
    assert root.list_dirs("step_") == [f"step_{s:08d}" for s in (2, 4, 6, 8, 10)]
    assert json.loads((root / "step_00000004").read_text(keys.META_FILE))["loss"] == 1.0
    assert (root / "step_00000004").size(keys.META_FILE) == len(meta4)
    assert (root / "step_00000004").size("absent.pt") is None
    expected = hashlib.sha256(meta4).hexdigest()
    assert (root / "step_00000004").sha256(keys.META_FILE) == expected

    gone = prune_checkpoints(f"s3://{BUCKET}/r", keep=2)
    assert all(isinstance(g, Store) for g in gone)
    assert sorted(g.name for g in gone) == ["step_00000002", "step_00000006"]
    assert _steps(s3, "r/checkpoints/") == [
        ".validate_storage_marker",
        "step_00000004",
        "step_00000008",
        "step_00000010",
    ]
    # None of them is a complete checkpoint (no manifests): discovery says so and finds nothing.
    assert find_latest_checkpoint(f"s3://{BUCKET}/r") is None
    with pytest.raises(
        CheckpointError, match=f"s3://{BUCKET}/r/checkpoints/step_00000010 lacks rank 0's manifest"
    ):
        validate_checkpoint(f"s3://{BUCKET}/r/checkpoints/step_00000010")
    with pytest.raises(CheckpointError, match="has no meta.json"):
        validate_checkpoint(f"s3://{BUCKET}/r/checkpoints/step_00000099")
    with pytest.raises(ValueError, match="cannot open storage 'nosuch://x'"):
        resolve("nosuch://x")
    # A local path keeps its own spelling (and error messages), as before.
    local = resolve(tmp_path / "out")
    assert local.is_local and local.uri == str(tmp_path / "out")
    assert find_latest_checkpoint(tmp_path / "out") is None


def _checkpoint_files(root) -> None:
    (root / "model").mkdir(parents=True)
    (root / "model" / "shard.pt").write_bytes(b"w" * 1000)
    (root / "meta.json").write_text("{}")
    (root / "manifest_rank_0.json").write_text("{}")


@pytest.mark.slow
def test_upload_retries_through_an_outage(s3, s3_server, tmp_path, caplog):
    """The object store is down when a checkpoint upload starts and back 5 s later: the upload retries
    with backoff, warns, and completes. (The server is stopped before the upload, not during it: a stopped
    moto server still answers on connections already open, so a mid-upload stop is not deterministic.)"""
    _checkpoint_files(tmp_path / "ckpt")
    store = resolve(f"s3://{BUCKET}/outage/checkpoints/step_00000010")
    s3_server.stop()
    threading.Timer(5.0, s3_server.start).start()
    with caplog.at_level(logging.WARNING, logger="scgpt_dist.train.storage"):
        upload_dir(tmp_path / "ckpt", store, last=("meta.json", "manifest_rank_0.json"),
                   retries=5, backoff_s=0.5)  # fmt: skip
    assert any("retry 1/5" in r.getMessage() for r in caplog.records)
    assert sorted(k for k in _keys(s3, "outage/") if not k.endswith("/")) == [
        f"outage/checkpoints/step_00000010/{n}"
        for n in ("manifest_rank_0.json", "meta.json", "model/shard.pt")
    ]
    assert find_latest_checkpoint(resolve(f"s3://{BUCKET}/outage"), verify_checksums=False) is None


@pytest.mark.slow
def test_upload_gives_up_with_a_clear_error_and_no_marker(s3, s3_server, tmp_path):
    """The store stays down: after the retries, an error naming the file and the store, and nothing in
    the store that a resume could take for a checkpoint."""
    _checkpoint_files(tmp_path / "ckpt")
    store = resolve(f"s3://{BUCKET}/gone/checkpoints/step_00000010")
    s3_server.stop()
    with pytest.raises(OSError, match=r"could not write .* to s3://.*after 3 attempts"):
        upload_dir(tmp_path / "ckpt", store, last=("meta.json", "manifest_rank_0.json"),
                   retries=2, backoff_s=0.2)  # fmt: skip
    s3_server.start()
    assert not [k for k in _keys(s3, "gone/") if not k.endswith("/")]
    assert find_latest_checkpoint(resolve(f"s3://{BUCKET}/gone")) is None


@pytest.mark.slow
def test_pretraining_with_checkpoints_on_s3(s3, ray_local, demo_soma, tmp_path):
    """Stop at step 6 and resume to 12 with every checkpoint in the bucket: manifests there, resume from the
    bucket's step 6, retention in the bucket, consolidated model local; then a corrupted shard object is
    detected and the previous good checkpoint is chosen."""
    from scgpt_dist.train.driver import run_pretraining

    storage = f"s3://{BUCKET}/run"
    out = tmp_path / "run"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"output_dir={out}",
        f"data.source.soma_uri={demo_soma}",
        "data.build_demo=false",
        f"mlflow.tracking_uri={db}",
        "mlflow.system_metrics=false",
        f"train.storage_path={storage}",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=2",
        "train.keep_best_checkpoint=false",
    ]
    t0 = time.perf_counter()
    first = run_pretraining(load_config(TINY_CONFIG, overrides + ["train.stop_after_steps=6"]))
    t_first = time.perf_counter() - t0
    assert first["step"] == 6 and "model_dir" not in first
    assert first["checkpoint"] == f"{storage}/checkpoints/step_00000006"
    assert [s for s in _steps(s3, "run/checkpoints/") if s.startswith("step_")] == [
        "step_00000003",
        "step_00000006",
    ]
    files = _keys(s3, "run/checkpoints/step_00000006/")
    names = {k.rsplit("/", 1)[-1] for k in files}
    assert {"manifest_rank_0.json", "manifest_rank_1.json", "meta.json", "vocab.json"} <= names
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in names
    assert not list(out.glob("checkpoints/step_*"))  # nothing of the checkpoints on local disk
    validate_checkpoint(f"{storage}/checkpoints/step_00000006")

    t0 = time.perf_counter()
    second = run_pretraining(load_config(TINY_CONFIG, overrides))
    t_second = time.perf_counter() - t0
    assert second["step"] == 12
    # Retention ran in the bucket: the newest two remain.
    assert [s for s in _steps(s3, "run/checkpoints/") if s.startswith("step_")] == [
        "step_00000009",
        "step_00000012",
    ]
    # The second invocation resumed from the bucket's step 6: tagged so, and MLflow has each step once.
    client = MlflowClient(db)
    run = client.get_run(second["run_id"])
    assert second["run_id"] == first["run_id"]
    assert run.data.tags["resumed_from"] == f"{storage}/checkpoints/step_00000006"
    assert run.data.tags["checkpoint.latest"] == f"{storage}/checkpoints/step_00000012"
    steps = [m.step for m in client.get_metric_history(second["run_id"], "loss")]
    assert steps == [2, 3, 4, 6, 8, 9, 10, 12]  # log points and checkpoint steps, each once
    meta12 = json.loads(
        s3.get_object(Bucket=BUCKET, Key="run/checkpoints/step_00000012/meta.json")["Body"].read()
    )
    assert meta12["step"] == 12 and meta12["world_size"] == 2
    # The consolidated model is local and equals the bucket's final checkpoint.
    model_dir = out / "model"
    assert second["model_dir"] == str(model_dir) and (model_dir / keys.MODEL_FILE).is_file()
    final = load_consolidated(model_dir).model.state_dict()

    # Overwrite one shard object with garbage of the same size: only the checksum can tell.
    shard = "run/checkpoints/step_00000012/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = s3.head_object(Bucket=BUCKET, Key=shard)["ContentLength"]
    s3.put_object(Bucket=BUCKET, Key=shard, Body=os.urandom(size))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="zero_pp_rank_1.*fails its sha256 checksum"):
        validate_checkpoint(f"{storage}/checkpoints/step_00000012")
    t_validate = time.perf_counter() - t0
    latest = find_latest_checkpoint(storage)
    assert isinstance(latest, Store) and latest.uri == f"{storage}/checkpoints/step_00000009"
    # Consolidating from the bucket downloads to a temporary directory, which is gone afterwards.
    t0 = time.perf_counter()
    consolidate(latest, tmp_path / "model9")
    t_consolidate = time.perf_counter() - t0
    earlier = load_consolidated(tmp_path / "model9")
    assert earlier.meta["step"] == 9
    assert not all(torch.equal(final[k], v) for k, v in earlier.model.state_dict().items())
    shard_bytes = sum(
        o["Size"]
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="run/checkpoints/step_00000009/")[
            "Contents"
        ]
    )
    print(  # shown with `pytest -s`: the figures docs/operations.md quotes
        f"object store timings: run to 6 {t_first:.1f}s, resume to 12 {t_second:.1f}s, validate "
        f"(sha256 over S3) {t_validate:.2f}s, consolidate from S3 {t_consolidate:.2f}s, "
        f"checkpoint {shard_bytes} bytes"
    )

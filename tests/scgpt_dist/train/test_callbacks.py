"""The callback protocol (order, state kept across a restart), the console progress line (content, cadence,
the evaluation line) and the MLflow callback through a tracking-server outage."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scgpt_dist.train.callbacks import (
    Callback,
    CallbackList,
    MlflowCallback,
    ProgressCallback,
    saved_callback_state,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS = {
    "loss": 31.25,
    "loss_gep": 15.9,
    "loss_gepc": 15.35,
    "lr": 0.003,
    "tokens_per_s": 36100.0,
    "data_wait_fraction": 0.012,
}


class _Recorder(Callback):
    def __init__(self, name: str, calls: list):
        self.name, self.calls, self.count = name, calls, 0

    def state_dict(self) -> dict:
        return {"count": self.count} if self.count else {}

    def load_state_dict(self, state: dict) -> None:
        self.count = state.get("count", 0)

    def on_log(self, step, metrics):
        self.count += 1
        self.calls.append((self.name, "log", step))

    def on_checkpoint(self, step, path):
        self.calls.append((self.name, "checkpoint", step))


def test_callbacks_are_called_in_order_and_keep_their_own_state_across_a_restart():
    calls = []
    cbs = CallbackList([_Recorder("a", calls), _Recorder("b", calls)])
    cbs.load_state_dict({})  # a fresh start
    assert cbs.state_dict() == {}  # nothing to keep yet: nothing stored
    cbs.on_log(1, {"loss": 1.0})
    cbs.on_checkpoint(1, "ckpt")
    assert calls == [
        ("a", "log", 1),
        ("b", "log", 1),
        ("a", "checkpoint", 1),
        ("b", "checkpoint", 1),
    ]
    meta = {"step": 1, "callbacks": cbs.state_dict()}  # what the checkpointer writes into meta.json
    restarted = CallbackList([_Recorder("a", []), _Recorder("b", [])])
    restarted.load_state_dict(saved_callback_state(meta))
    assert [cb.count for cb in restarted.callbacks] == [1, 1]
    # A checkpoint from before the protocol kept only the MLflow buffer, as `pending_metrics`.
    old = {"step": 4, "pending_metrics": [["loss", 2.0, 0, 4]]}
    assert saved_callback_state(old) == {"mlflow": {"pending_metrics": [["loss", 2.0, 0, 4]]}}
    with pytest.raises(ValueError, match="unique"):
        CallbackList([_Recorder("a", []), _Recorder("a", [])])


def test_progress_line_content_and_cadence(capfd, monkeypatch):
    clock = iter([0.0, 1.0, 5.0, 30.0, 31.0])  # constructor, then one reading per update
    monkeypatch.setattr("scgpt_dist.train.callbacks.time.perf_counter", lambda: next(clock))
    progress = ProgressCallback(total_steps=100, start_step=0, every_s=15.0)
    progress.update(20, METRICS)  # t=1: the first line always prints
    progress.update(40, METRICS)  # t=5: within 15 s of the last line, skipped
    progress.update(60, METRICS)  # t=30: prints
    progress.update(100, METRICS)  # t=31: the last step always prints
    lines = capfd.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        "step 20/100 (20%)",
        "step 60/100 (60%)",
        "step 100/100 (100%)",
    ]
    assert lines[1] == (
        "step 60/100 (60%) | loss 31.25 (gep 15.9, gepc 15.35) | lr 3.0e-03 | 36.1k tok/s"
        " | data wait 1% | 0m30s, ETA 0m20s"
    )


def test_resumed_run_eta_counts_only_its_own_steps(capfd, monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr("scgpt_dist.train.callbacks.time.perf_counter", lambda: next(clock))
    ProgressCallback(total_steps=1000, start_step=900, every_s=0).update(950, METRICS)
    assert capfd.readouterr().out.strip().endswith("0m10s, ETA 0m10s")


def test_evaluation_line(capfd):
    ProgressCallback.evaluation(
        300,
        {
            "eval/gep_mse": 81.3,
            "eval/baseline_per_gene_mean": 113.8,
            "eval/baseline_per_gene_type_mean": 90.1,
            "eval/knn_type": 0.93,
            "eval/mean_cosine": 0.874,
        },
    )
    assert capfd.readouterr().out.strip() == (
        "eval step 300 | held-out GEP 81.3 (baselines: per_gene_mean 113.8, per_gene_type_mean 90.1)"
        " | kNN type 0.930 | mean cosine 0.874"
    )


def _start_mlflow_server(port: int, store: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError("mlflow server did not start in 120 s")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its uvicorn/gunicorn workers
    proc.wait()


@pytest.mark.slow
def test_mlflow_outage_keeps_metrics_and_training(tmp_path, caplog, monkeypatch):
    """A real tracking server stopped mid-run: commits fail fast with one warning and keep the metrics;
    after a restart on the same port the first commit writes all of them, each step once."""
    from mlflow.tracking import MlflowClient

    # The callback's own HTTP settings, set here so that they are undone after the test.
    for name, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "10")):
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", value)

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow_server(port, tmp_path)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        cb = MlflowCallback(uri, run_id)
        for step in (1, 2):
            cb.log(step, {"loss": 10.0 - step})
        assert cb.commit({"step": 2})
        _stop(server)
        with caplog.at_level(logging.WARNING, logger="scgpt_dist.train.callbacks"):
            t0 = time.monotonic()
            for step in (3, 4, 5, 6):
                cb.log(step, {"loss": 10.0 - step})
                if step % 2 == 0:
                    assert cb.commit({"step": step}) is False
            assert time.monotonic() - t0 < 30  # no minutes of retries per write
            assert [r[3] for r in cb.pending()] == [3, 4, 5, 6]  # what a checkpoint would store
            server = _start_mlflow_server(port, tmp_path)
            cb.log(7, {"loss": 3.0})
            assert cb.commit({"step": 7})
        down = [r for r in caplog.records if "not reachable" in r.getMessage()]
        back = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(down) == 1 and len(back) == 1
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6, 7]
        assert MlflowClient(uri).get_run(run_id).data.tags["step"] == "7"
        # A resumed worker replays a checkpoint's stored rows: only the steps MLflow lacks are written.
        cb2 = MlflowCallback(uri, run_id)
        cb2.replay([["loss", 1.0, 0, 6], ["loss", 2.0, 0, 8]])
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6, 7, 8]
        # It then reruns steps MLflow already has (resumed from an older checkpoint): not logged twice.
        for step in (7, 8, 9):
            cb2.log(step, {"loss": 0.5})
        assert cb2.commit()
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    finally:
        _stop(server)

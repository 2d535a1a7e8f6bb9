"""Kill a Ray Train worker for real mid-run: the run restarts its workers, resumes from the last complete
checkpoint, and the MLflow loss curve has every step exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from scgpt_dist.checkpoint import CheckpointError, validate_checkpoint
from tests.conftest import TINY_CONFIG


def test_worker_killed_mid_run_resumes(demo_soma, tmp_path):
    out = tmp_path / "run"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)  # the job starts its own local Ray cluster
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.pretrain",
            "--config",
            str(TINY_CONFIG),
            f"output_dir={out}",
            f"data.source.soma_uri={demo_soma}",
            "data.build_demo=false",
            f"mlflow.tracking_uri={db}",
            "train.max_steps=40",
            "train.checkpoint_every=4",
            "train.max_failures=1",
            "train.keep_checkpoints=2",
            "train.keep_best_checkpoint=false",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first_ckpt = out / "checkpoints" / "step_00000004"
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()[-5000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            try:
                validate_checkpoint(first_ckpt)
                break
            except (CheckpointError, OSError):
                time.sleep(0.2)
        victim = json.loads((out / "workers" / "rank_1.json").read_text())
        os.kill(victim["pid"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-5000:]

    restarted = json.loads((out / "workers" / "rank_1.json").read_text())
    assert restarted["pid"] != victim["pid"]  # a new worker process took rank 1
    meta = json.loads((out / "checkpoints" / "step_00000040" / "meta.json").read_text())
    assert meta["step"] == 40
    # Retention: only the newest 2 checkpoints remain.
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000036",
        "step_00000040",
    ]
    client = MlflowClient(db)
    run_id = (out / "mlflow_run_id").read_text().strip()
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps == list(range(2, 41, 2))  # each step once: no duplicate, no gap across the restart
    assert client.get_run(run_id).info.status == "FINISHED"

"""`ray job submit -- python -m jobs.pretrain ...` against a real `ray start --head` cluster on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    port, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = subprocess.run(["ray", "job", "list", "--address", address], capture_output=True, env=env)
        if ok.returncode == 0:
            break
        if head.poll() is not None:
            pytest.fail(f"ray start failed:\n{head.stdout.read()}")
        time.sleep(2)
    else:
        pytest.fail("the Ray dashboard (job server) did not come up in 120 s")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_round_trip(ray_head, demo_soma, tmp_path):
    address, env = ray_head
    out = tmp_path / "job"
    cmd = [
        "ray", "job", "submit", "--address", address, "--",
        "python", "-m", "jobs.pretrain", "--config", str(TINY_CONFIG),
        f"output_dir={out}", f"data.source.soma_uri={demo_soma}", "data.build_demo=false",
        "train.max_steps=4", "train.checkpoint_every=4",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path.home())
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in res.stdout
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step_00000004" / "meta.json").is_file()

"""`ray job submit -- python -m jobs.pretrain ...` against a real `ray start --head` cluster on 127.0.0.1."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import RAY_CLI, TINY_CONFIG, project_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group, with token auth on; killed as a group after."""
    port, dash = _free_port(), _free_port()
    # Short: Ray's socket paths have a length limit.
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    env = project_env(RAY_AUTH_MODE="token")
    subprocess.run(
        [RAY_CLI, "get-auth-token", "--generate"], env=env, capture_output=True, check=True
    )
    log_path = Path(temp) / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [
                RAY_CLI,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=4",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
                # Fresh ports: the session's in-process Ray already holds the agents' default ports.
                *(
                    f"--{name}={_free_port()}"
                    for name in (
                        "dashboard-agent-listen-port",
                        "dashboard-agent-grpc-port",
                        "metrics-export-port",
                        "runtime-env-agent-port",
                        "ray-client-server-port",
                    )
                ),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            ok = subprocess.run(
                [RAY_CLI, "job", "list", "--address", address], capture_output=True, env=env
            )
            if ok.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(
                    f"the Ray head / job server did not come up:\n{log_path.read_text()[-3000:]}\n"
                    f"{ok.stderr.decode()[-2000:]}"
                )
            time.sleep(2)
        yield address, env, Path(temp)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def submit_pretrain(address: str, env: dict, overrides: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit -- python -m jobs.pretrain --config tiny.yaml <overrides>`, blocking until the job ends.

    The job server can answer before the head's agent takes jobs: retry that one error for up to 2 minutes.
    """
    cmd = [RAY_CLI, "job", "submit", "--address", address, "--", "python", "-m", "jobs.pretrain",
           "--config", str(TINY_CONFIG), *overrides]  # fmt: skip
    deadline = time.time() + 120
    while True:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path.home()
        )
        if "No available agent" not in res.stdout + res.stderr or time.time() > deadline:
            return res
        time.sleep(3)


def test_ray_job_submit_round_trip(ray_head, demo_soma, tmp_path):
    address, env, temp = ray_head
    out = tmp_path / "job"
    res = submit_pretrain(
        address,
        env,
        [
            f"output_dir={out}",
            f"data.source.soma_uri={demo_soma}",
            "data.build_demo=false",
            "train.max_steps=4",
            "train.checkpoint_every=4",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1500:] + _agent_logs(temp)
    assert "succeeded" in res.stdout
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step_00000004" / "meta.json").is_file()


def _agent_logs(temp: Path) -> str:
    """The head's agent and raylet logs, for a failure message."""
    logs = temp / "session_latest" / "logs"
    parts = []
    for name in ("dashboard_agent.log", "raylet.out", "runtime_env_agent.log"):
        path = logs / name
        if path.is_file():
            parts.append(f"\n--- {name} ---\n" + path.read_text()[-2500:])
    return "".join(parts)

"""cluster/local: a head and a second Ray node on 127.0.0.1 as separate processes (1 CPU each), with token
auth; `ray job submit -- python -m jobs.pretrain ...` round trip: the job succeeds, runs its two workers on
both nodes (ZeRO-3 across them) and consolidates its model; teardown ends exactly that cluster.

This is the suite's one `ray job submit` test: a single `ray start --head` node is the same path with one
node fewer, and each extra cluster costs the suite about two minutes on 2 cores."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import RAY_CLI, REPO, TINY_CONFIG

LOCAL = REPO / "cluster" / "local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _agent_logs(state: Path) -> str:
    """The head's agent and raylet logs, for a failure message."""
    logs = state / "ray" / "session_latest" / "logs"
    parts = []
    for name in ("dashboard_agent.log", "raylet.out", "runtime_env_agent.log"):
        path = logs / name
        if path.is_file():
            parts.append(f"\n--- {name} ---\n" + path.read_text()[-2500:])
    return "".join(parts)


def _ray_start_pids(state_dir: Path) -> list[int]:
    return [int(p) for p in (state_dir / "pids").read_text().split()]


def _alive(pid: int) -> bool:
    """Running (a zombie, whose reaper is outside this test, counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_two_node_cluster_runs_workers_on_both_nodes(demo_soma, tmp_path):
    state = Path("/tmp") / f"scgpt-mn-{os.getpid()}"  # short: Ray socket paths have a length limit
    dash = _free_port()
    # Only system directories on PATH: up.sh must find Ray through PYTHON, not PATH.
    env = {
        **os.environ,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHON": sys.executable,
        "STATE_DIR": str(state),
        "HEAD_PORT": str(_free_port()),
        "DASHBOARD_PORT": str(dash),
        "PORT_BASE": "47200",
        "CPUS_PER_NODE": "1",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    up = subprocess.run(
        ["bash", str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    pids = _ray_start_pids(state) if (state / "pids").exists() else []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        address = up.stdout.strip().splitlines()[-1]
        assert address == f"http://127.0.0.1:{dash}"
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
                "train.zero_stage=3",
                # 1 CPU per node: each worker takes half, read tasks a quarter; SPREAD: one per node.
                "train.cpus_per_worker=0.5",
                "train.placement_strategy=SPREAD",
                "data.stream.read_task_cpus=0.25",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            ],
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1500:] + _agent_logs(state)
        assert "succeeded" in res.stdout
        meta = json.loads((out / "checkpoints" / "step_00000004" / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["zero_stage"] == 3
        assert len(set(meta["worker_nodes"])) == 2  # rank 0 and rank 1 ran on different nodes
        assert (out / "model" / "model.safetensors").is_file()  # ZeRO-3 shards consolidated
    finally:
        subprocess.run(["bash", str(LOCAL / "down.sh")], env=env, timeout=120)
    assert pids and not any(_alive(p) for p in pids)
    assert not state.exists()

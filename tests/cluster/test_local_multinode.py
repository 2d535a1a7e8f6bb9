"""cluster/local: a head and a second Ray node on 127.0.0.1 as separate processes, with token auth;
`ray job submit -- python -m jobs.pretrain ...` round trip: the job runs its two workers on both nodes (ZeRO-3
across them); the second node is drained as a spot notice would (`ray drain-node`), the workers write a
checkpoint and train on, the node is killed, Ray Train restarts them on the head from that checkpoint, the
job succeeds with every step logged once and consolidates its model; teardown ends exactly that cluster.

This is the suite's one `ray job submit` test: a single `ray start --head` node is the same path with one
node fewer, and each extra cluster costs the suite about two minutes on 2 cores."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _node_ids(head_port: int, env: dict) -> dict[int, str]:
    """Node manager port -> Ray node id of the live nodes of the cluster at 127.0.0.1:`head_port`."""
    code = (
        f"import json, ray; ray.init(address='127.0.0.1:{head_port}', logging_level='ERROR'); "
        "print(json.dumps({n['NodeManagerPort']: n['NodeID'] for n in ray.nodes() if n['Alive']}))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def _wait_for(what: str, found, job: subprocess.Popen, timeout: float = 300):
    """Poll `found()` until it returns something; fail if the job ends first or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        hit = found()
        if hit:
            return hit
        if job.poll() is not None:
            raise AssertionError(f"the job ended ({job.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout} s")


def _metas(checkpoints: Path) -> dict[int, dict]:
    out = {}
    for meta in checkpoints.glob("step_*/meta.json"):
        try:
            out[int(meta.parent.name.split("_")[1])] = json.loads(meta.read_text())
        except (json.JSONDecodeError, OSError):
            pass  # being written
    return out


@pytest.mark.slow
def test_two_node_cluster_survives_a_node_drain_and_its_loss(demo_soma, tmp_path):
    from mlflow.tracking import MlflowClient

    state = Path("/tmp") / f"scgpt-mn-{os.getpid()}"  # short: Ray socket paths have a length limit
    dash, head_port, port_base = _free_port(), _free_port(), 47200
    # Only system directories on PATH: up.sh must find Ray through PYTHON, not PATH.
    env = {
        **os.environ,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHON": sys.executable,
        "STATE_DIR": str(state),
        "HEAD_PORT": str(head_port),
        "DASHBOARD_PORT": str(dash),
        "PORT_BASE": str(port_base),
        # 2 logical CPUs per node: the head alone must hold both workers and a read task after the drain.
        "CPUS_PER_NODE": "2",
        "RAY_AUTH_MODE": "token",
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",  # Ray Train's drain watcher (default 5 s)
    }
    env.pop("RAY_ADDRESS", None)
    up = subprocess.run(
        ["bash", str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    pids = _ray_start_pids(state) if (state / "pids").exists() else []
    job = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        address = up.stdout.strip().splitlines()[-1]
        assert address == f"http://127.0.0.1:{dash}"
        nodes = _node_ids(head_port, env)
        head, second = nodes[port_base + 4], nodes[port_base + 14]  # up.sh's node manager ports
        out, steps = tmp_path / "job", 100
        checkpoints = out / "checkpoints"
        cmd = [RAY_CLI, "job", "submit", "--address", address, "--", "python", "-m",
               "jobs.pretrain", "--config", str(TINY_CONFIG),
               f"output_dir={out}",
               f"data.source.soma_uri={demo_soma}",
               "data.build_demo=false",
               f"train.max_steps={steps}",
               "train.checkpoint_every=20",
               "train.keep_checkpoints=10",
               "train.stop_poll_s=0.2",
               "train.zero_stage=3",
               # each worker takes half a CPU, read tasks a quarter; SPREAD: one worker per node.
               "train.cpus_per_worker=0.5",
               "train.placement_strategy=SPREAD",
               "data.stream.read_task_cpus=0.25",
               f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
        # The client's output goes to a file: a pipe nobody reads while the test waits could fill up.
        job_log = tmp_path / "submit.log"
        with job_log.open("w") as sink:
            job = subprocess.Popen(
                cmd, env=env, cwd=Path.home(), stdout=sink, stderr=subprocess.STDOUT
            )
        first = _wait_for("the step-20 checkpoint", lambda: _metas(checkpoints).get(20), job)
        assert first["world_size"] == 2 and first["zero_stage"] == 3
        assert sorted(first["worker_nodes"]) == sorted([head, second])  # one rank per node
        # A spot notice: the second node will be gone in 30 s.
        drain = subprocess.run(
            [RAY_CLI, "drain-node", "--address", f"127.0.0.1:{head_port}", "--node-id", second,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot notice (test)",
             "--deadline-remaining-seconds", "30"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert drain.returncode == 0, drain.stdout + drain.stderr
        saved = _wait_for(
            "a checkpoint for the drain",
            lambda: [s for s, m in _metas(checkpoints).items() if m.get("node_drain")],
            job,
            timeout=60,
        )
        os.killpg(pids[1], signal.SIGKILL)  # the node goes: its raylet, workers and agents at once
        job.wait(timeout=400)
        log = job_log.read_text()
        assert job.returncode == 0, log[-4000:] + _agent_logs(state)
        assert "succeeded" in log
        assert "node drain" in log and "training goes on" in log
        metas = _metas(checkpoints)
        # written because the drain came (the flag is set only then, and the log names the step); the step
        # itself may also fall on the 20-step schedule, so it is not checked for that
        assert saved[0] < steps and metas[saved[0]]["node_drain"]
        assert f"checkpoint at step {saved[0]}, training goes on" in log
        last = metas[steps]
        assert last["world_size"] == 2
        assert last["worker_nodes"] == [head, head]  # restarted on the head
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        logged = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(logged) == sorted(set(logged)) and max(logged) == steps  # every step once
        # the restarted ranks log "rank r resumed from ... at step N"
        assert f"at step {saved[0]}" in log
        assert (out / "model" / "model.safetensors").is_file()  # ZeRO-3 shards consolidated
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        subprocess.run(["bash", str(LOCAL / "down.sh")], env=env, timeout=120)
    assert pids and not any(_alive(p) for p in pids)
    assert not state.exists()

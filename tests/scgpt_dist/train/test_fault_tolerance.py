"""The fault matrix (docs/reliability.md) with real processes and real signals: a Ray Train worker or a read
task killed mid-run, the driver restarted after retention or SIGKILLed, SIGTERM (preemption), a stalled data
stream, a cluster too small for the run. Runs resume from the newest complete checkpoint and the MLflow loss
curve has every step exactly once."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from scgpt_dist.train.checkpoint import CheckpointError, validate_checkpoint
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` skips it


def _pretrain_while(fault, overrides: list[str]) -> dict:
    """`run_pretraining` of the tiny config in this process (the session's Ray) while `fault(done)` runs
    in a thread; `done` (a threading.Event) is set when the run ends, so the thread can stop looking."""
    import threading

    from scgpt_dist.config import load_config
    from scgpt_dist.train.driver import run_pretraining

    done = threading.Event()
    thread = threading.Thread(target=fault, args=(done,), daemon=True)
    thread.start()
    try:
        return run_pretraining(load_config(TINY_CONFIG, overrides))
    finally:
        done.set()
        thread.join()


def test_worker_killed_mid_run_resumes(ray_local, tiny_overrides, tmp_path):
    """SIGKILL of rank 1's process after the first checkpoint: Ray Train starts a new worker group, which
    resumes from the newest complete checkpoint and finishes, with every step logged once."""
    out = tmp_path / "run"
    victim: dict = {}

    def kill_rank_1_after_first_checkpoint(done) -> None:
        while not done.is_set():
            try:
                validate_checkpoint(out / "checkpoints" / "step_00000004")
            except (CheckpointError, OSError):
                time.sleep(0.1)
                continue
            victim.update(json.loads((out / "workers" / "rank_1.json").read_text()))
            os.kill(victim["pid"], signal.SIGKILL)
            return

    summary = _pretrain_while(
        kill_rank_1_after_first_checkpoint,
        tiny_overrides
        + [
            "train.max_steps=20",
            "train.checkpoint_every=4",
            "train.max_failures=1",
            "train.keep_checkpoints=2",
            "train.keep_best_checkpoint=false",
        ],
    )
    assert victim, "rank 1 was never killed"
    assert summary["step"] == 20
    restarted = json.loads((out / "workers" / "rank_1.json").read_text())
    assert restarted["pid"] != victim["pid"]  # a new worker process took rank 1
    meta = json.loads((out / "checkpoints" / "step_00000020" / "meta.json").read_text())
    assert meta["step"] == 20
    # Retention: only the newest 2 checkpoints remain.
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000016",
        "step_00000020",
    ]
    client = MlflowClient(summary["tracking_uri"])
    run_id = summary["run_id"]
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps == list(range(2, 21, 2))  # each step once: no duplicate, no gap across the restart
    assert client.get_run(run_id).info.status == "FINISHED"


def test_driver_restart_after_retention_deleted_checkpoints(ray_local, tiny_overrides, tmp_path):
    """Issue 19's repro: retention deletes checkpoints, then the same command with a larger max_steps (a
    driver restart) must resume from the newest complete checkpoint instead of refusing to start; here the
    newest is also left incomplete, as a rank killed in the middle of its upload leaves it."""
    from scgpt_dist.config import load_config
    from scgpt_dist.train.driver import run_pretraining

    common = tiny_overrides + [
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
        "train.keep_best_checkpoint=false",
    ]
    first = run_pretraining(load_config(TINY_CONFIG, common + ["train.max_steps=8"]))
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000006",
        "step_00000008",
    ]  # steps 2 and 4 were deleted by retention
    # What a rank SIGKILLed while uploading step 8 leaves: part of its shard, no manifest.
    newest = out / "checkpoints" / "step_00000008"
    (newest / "manifest_rank_1.json").unlink()
    shard = next(p for p in newest.rglob("*rank_1*") if p.is_file())
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    second = run_pretraining(load_config(TINY_CONFIG, common + ["train.max_steps=12"]))
    assert second["step"] == 12 and second["run_id"] == first["run_id"]
    tags = MlflowClient(second["tracking_uri"]).get_run(second["run_id"]).data.tags
    assert tags["resumed_from"].endswith("step_00000006")  # the incomplete step 8 was passed over
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000010",
        "step_00000012",
    ]
    client = MlflowClient(second["tracking_uri"])
    steps = [m.step for m in client.get_metric_history(second["run_id"], "loss")]
    assert sorted(steps) == list(range(2, 13, 2))  # each step once across the restart


def test_resource_check_names_the_numbers_and_the_knobs(ray_local, tiny_overrides):
    """A cluster too small for the workers plus a read task stops with one line instead of waiting forever."""
    import pytest

    from scgpt_dist.config import load_config
    from scgpt_dist.train.driver import check_cluster_resources

    fits = load_config(
        TINY_CONFIG, tiny_overrides
    )  # 2 x 1 CPU + 1 read task on the session's 4 CPUs
    assert check_cluster_resources(fits, local=True) is None
    big = tiny_overrides + ["train.num_workers=8"]  # 8 x 0.5 + 0.5 > 4
    with pytest.raises(ValueError) as err:
        check_cluster_resources(load_config(TINY_CONFIG, big), local=True)
    message = str(err.value)
    assert "has 4 CPUs and training needs 4.5" in message
    for knob in ("train.num_workers", "train.cpus_per_worker", "data.stream.read_task_cpus"):
        assert knob in message
    # On a cluster we connected to, an autoscaler may add nodes: a warning, and the run goes on.
    assert "needs 4.5" in check_cluster_resources(load_config(TINY_CONFIG, big), local=False)
    off = load_config(TINY_CONFIG, big + ["ray.resource_check=ignore"])
    assert check_cluster_resources(off, local=True) is None


def test_sigterm_checkpoints_and_exits_75_then_resumes(demo_soma, tmp_path):
    """Preemption: SIGTERM to the job's entry point makes the workers checkpoint after the current step and
    the job exit with 75; the same command again continues. Then a SIGKILLed driver: the same command once
    more resumes from the newest complete checkpoint and finishes, with every step logged once."""
    from scgpt_dist.train.checkpoint import find_latest_checkpoint, read_meta
    from scgpt_dist.train.preemption import EXIT_PREEMPTED

    out = tmp_path / "run"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    n_steps = 120  # the SIGTERM lands right after the first checkpoint, at step 20-40
    cmd = [
        sys.executable, "-m", "jobs.pretrain", "--config", str(TINY_CONFIG),
        f"output_dir={out}", f"data.source.soma_uri={demo_soma}", "data.build_demo=false",
        f"mlflow.tracking_uri={db}", f"train.max_steps={n_steps}", "train.checkpoint_every=20",
        "train.stop_poll_s=0.5", "ray.num_cpus=4",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 300
        while find_latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.stdout.read()[-5000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, output[-5000:]
    stopped = read_meta(find_latest_checkpoint(out))["step"]
    assert 20 <= stopped < n_steps, output[-3000:]
    assert not (out / "model").exists()  # not finished: nothing consolidated
    client = MlflowClient(db)
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.tags["preempted_at_step"] == str(stopped)

    # The driver SIGKILLed (no handler runs, no checkpoint of its own) after the resumed run's next
    # checkpoint: Ray's processes share its fate, and the same command once more finishes the run.
    resumed = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 300
        while read_meta(find_latest_checkpoint(out))["step"] <= stopped:
            assert resumed.poll() is None, resumed.stdout.read()[-5000:]
            assert time.time() < deadline, "no new checkpoint within 300 s"
            time.sleep(0.2)
        ray_processes = psutil.Process(resumed.pid).children(recursive=True)
        resumed.kill()
        resumed.communicate(timeout=60)
        # Nothing of the killed job lives on to write into the run directory beside the next one: its
        # workers and raylet go with it. Ray's dashboard and runtime-env agents (no run state) outlive
        # it; ended here so they do not pile up.
        agent_names = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
        agents, others = [], []
        for p in ray_processes:
            try:
                (agents if p.name() in agent_names else others).append(p)
            except psutil.NoSuchProcess:
                pass  # already gone
        _, alive = psutil.wait_procs(others, timeout=60)  # the agents are not waited for: they stay
        assert not alive, [p.name() for p in alive]
        for p in agents:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    finally:
        if resumed.poll() is None:
            resumed.kill()
    assert resumed.returncode == -signal.SIGKILL
    killed_at = read_meta(find_latest_checkpoint(out))["step"]
    assert stopped < killed_at < n_steps

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert client.get_run(run_id).data.tags["resumed_from"].endswith(f"step_{killed_at:08d}")
    assert read_meta(find_latest_checkpoint(out))["step"] == n_steps
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert len(steps) == len(set(steps))  # each step once
    # Every log point, none lost at the stop (which flushes its window even at an odd step).
    every = set(range(2, n_steps + 1, 2))
    assert every <= set(steps) <= every | {stopped}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_stall_watchdog_names_the_data_stream(ray_local, tiny_overrides, tmp_path):
    """Read tasks that can never get their CPUs (the README's hang on a small cluster, with the resource
    check off): instead of waiting forever, the workers stop after train.stall_timeout_s and the run fails
    with one line that says the data stream is what is stuck."""
    import pytest

    from scgpt_dist.config import load_config
    from scgpt_dist.train.driver import run_pretraining

    cfg = load_config(
        TINY_CONFIG,
        tiny_overrides
        + [
            "data.stream.read_task_cpus=3.5",  # 4 CPUs, the 2 workers hold 1: no read task ever runs
            "data.stream.local_first_buffer=false",  # so not even the first buffer arrives
            "ray.resource_check=ignore",
            "train.stall_timeout_s=6",
            "eval.every=0",
        ],
    )
    t0 = time.time()
    with pytest.raises(RuntimeError, match="waiting for the next batch from the data stream"):
        run_pretraining(cfg)
    assert time.time() - t0 < 240


def test_read_task_killed_mid_run(ray_local, tiny_overrides, tmp_path):
    """SIGKILL of a Ray Data read task's worker process while the run streams: the run still finishes,
    with every logged step once."""
    from pathlib import Path

    killed: list[str] = []

    def kill_first_read_task(done) -> None:
        while not done.is_set() and not killed:
            for proc_dir in Path("/proc").iterdir():
                if not proc_dir.name.isdigit():
                    continue
                try:
                    cmd = (proc_dir / "cmdline").read_bytes()
                except OSError:
                    continue
                if cmd.startswith(b"ray::ReadSomaTokens"):
                    os.kill(int(proc_dir.name), signal.SIGKILL)
                    killed.append(cmd.split(b"\0")[0].decode())
                    break
            time.sleep(0.01)

    summary = _pretrain_while(
        kill_first_read_task,
        tiny_overrides
        + [
            "data.stream.task_cells=32",  # many short read tasks
            "train.max_steps=30",
            "train.checkpoint_every=10",
            "train.max_failures=1",
            "eval.every=0",
        ],
    )
    assert killed, "no read task was seen running"
    assert summary["step"] == 30
    steps = [
        m.step
        for m in MlflowClient(summary["tracking_uri"]).get_metric_history(summary["run_id"], "loss")
    ]
    assert sorted(steps) == list(range(2, 31, 2))

"""Shared fixtures: one local Ray instance per test session, a small demo SOMA experiment, tiny configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
"""The environment's bin directory: subprocesses use its `ray` and `python`, never whatever PATH has."""
RAY_CLI = str(BIN / "ray")


os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (4 logical CPUs on 2 cores: 2 train workers + read tasks)."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_soma(tmp_path_factory) -> Path:
    """The demo experiment (pbmc68k_reduced + 300 synthetic cells) written once per session."""
    from data_ingest.demo_data import build_demo_experiment

    return build_demo_experiment(tmp_path_factory.mktemp("soma") / "demo", synth_cells=300)


@pytest.fixture
def tiny_overrides(demo_soma, tmp_path) -> list[str]:
    """Overrides that point the tiny config at the session's experiment and a fresh output dir."""
    return [
        f"output_dir={tmp_path / 'run'}",
        f"data.source.soma_uri={demo_soma}",
        "data.build_demo=false",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


@pytest.fixture(scope="session")
def pretrained(ray_local, demo_soma, tmp_path_factory) -> dict:
    """The tiny config trained for real on 2 Ray Train workers (DeepSpeed ZeRO-2, gloo), in two invocations:
    stopped at step 6, then resumed from the step-6 checkpoint to step 12."""
    from scgpt_dist.config import load_config
    from scgpt_dist.train.checkpoint import CHECKPOINTS_DIR
    from scgpt_dist.train.driver import run_pretraining

    root = tmp_path_factory.mktemp("pretrained")
    overrides = [
        f"output_dir={root / 'run'}",
        f"data.source.soma_uri={demo_soma}",
        "data.build_demo=false",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "mlflow.registered_model=scgpt-tiny",
    ]
    first = run_pretraining(load_config(TINY_CONFIG, overrides + ["train.stop_after_steps=6"]))
    ckpts_after_first = sorted(p.name for p in (root / "run" / CHECKPOINTS_DIR).glob("step_*"))
    run_id_after_first = (root / "run" / "mlflow_run_id").read_text()
    second = run_pretraining(load_config(TINY_CONFIG, overrides))
    return {
        "root": root,
        "output_dir": root / "run",
        "first": first,
        "second": second,
        "ckpts_after_first": ckpts_after_first,
        "run_id_after_first": run_id_after_first,
        "overrides": overrides,
    }

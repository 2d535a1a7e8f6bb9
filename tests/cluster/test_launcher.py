"""Ray cluster launcher configs (cluster/*.yaml) against the schema and validation Ray itself applies on `ray up`."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.sdk import get_docker_host_mount_location

from tests.conftest import REPO

LAUNCHERS = sorted((REPO / "cluster").glob("*.yaml"))
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
GPU_INSTANCE_TYPES = {"aws": "p5.48xlarge", "gcp": "a3-highgpu-8g"}
ENV_FILE = "/home/ray/scgpt.env"
PROJECT_DIR = "/home/ray/scgpt-dist"
ENV_KEYS = ("MLFLOW_TRACKING_URI", "SCGPT_CHECKPOINT_URI", "SCGPT_SHARED_NFS", "RAY_AUTH_TOKEN")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _instance_type(node_type: dict) -> str:
    cfg = node_type["node_config"]
    return cfg.get("InstanceType") or cfg.get("machineType")


def _start_commands(cfg: dict) -> list[str]:
    return cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]


def test_both_clouds_are_shipped():
    assert {p.name for p in LAUNCHERS} == {"aws.yaml", "gcp.yaml"}
    assert {_load(p)["provider"]["type"] for p in LAUNCHERS} == {"aws", "gcp"}


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads(RAY_SCHEMA.read_text())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_matches_rays_schema(path, ray_schema):
    jsonschema.validate(_load(path), ray_schema)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_passes_rays_own_validation(path):
    """`ray up` fills in provider defaults (prepare_config) and validates the result (validate_config)."""
    validate_config(prepare_config(_load(path)))


def test_schema_validation_rejects_a_broken_config(ray_schema):
    """The check above can fail: typos in keys or values are caught."""
    cfg = _load(REPO / "cluster" / "aws.yaml")
    typo = copy.deepcopy(cfg)
    typo["head_start_ray_comands"] = typo.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_comands"):
        jsonschema.validate(typo, ray_schema)
    fractional = copy.deepcopy(cfg)
    fractional["available_node_types"]["gpu_h100x8"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(fractional, ray_schema)
    no_head = copy.deepcopy(cfg)
    no_head["head_node_type"] = "gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(no_head))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_node_types_head_cpu_data_and_8_gpu_training(path):
    cfg = _load(path)
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")

    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU")}
    cpu = {n: t for n, t in workers.items() if not t["resources"].get("GPU")}
    assert len(gpu) == 1 and cpu, "one 8-GPU training node type and at least one CPU data node type"
    ((gpu_name, gpu_type),) = gpu.items()
    assert gpu_type["resources"]["GPU"] == 8
    assert _instance_type(gpu_type) == GPU_INSTANCE_TYPES[provider]
    assert all(t["resources"]["CPU"] > 0 for t in cpu.values())
    # Training nodes are added on demand (min 0) and the cluster can hold the 4-node preset.
    assert gpu_type.get("min_workers", 0) == 0 and gpu_type["max_workers"] >= 4
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in workers.values())

    # The project images: CPU image on head and data workers, GPU image on the training workers.
    docker = cfg["docker"]
    assert docker["head_image"] == docker["worker_image"]
    assert docker["head_image"].endswith(":cpu-0.1.0")
    assert gpu_type["docker"]["worker_image"] == docker["head_image"].replace(":cpu-", ":gpu-")
    assert all("docker" not in t for t in cpu.values())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_dashboard_on_loopback_and_no_open_binds(path):
    cfg = _load(path)
    (head_start,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in path.read_text()


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_environment_comes_from_the_env_file(path):
    """MLflow URI, checkpoint URI, shared file system and Ray token reach every node from cluster/scgpt.env."""
    cfg = _load(path)
    assert cfg["file_mounts"] == {ENV_FILE: "cluster/scgpt.env"}
    # initialization_commands run on the host, where Ray stages file mounts before starting the container.
    host_copy = get_docker_host_mount_location(cfg["cluster_name"]) + ENV_FILE
    (init,) = cfg["initialization_commands"]
    assert f". {host_copy} " in init and '"$SCGPT_SHARED_NFS" /mnt/shared' in init
    assert "--volume /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    for cmd in _start_commands(cfg):
        if "ray start" in cmd:
            assert cmd.startswith(f"set -a && . {ENV_FILE} && set +a")
            # Jobs run from the directory `ray start` ran in: the project tree in the image.
            assert f"cd {PROJECT_DIR} &&" in cmd

    make_env = (REPO / "cluster" / "make-env.sh").read_text()
    for key in ENV_KEYS:
        assert f'echo "{key}=' in make_env
    assert "RAY_AUTH_MODE=token" in make_env


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_no_secrets_in_launcher_files(path):
    text = path.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*[:=]\s*\S", text)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "ssh_private_key" not in text


def test_env_file_is_git_ignored():
    res = subprocess.run(
        ["git", "check-ignore", "-q", "cluster/scgpt.env"], cwd=REPO, capture_output=True
    )
    assert res.returncode == 0, "cluster/scgpt.env holds the Ray token and must be git-ignored"


def _make_env(tmp_path: Path, **values: str) -> subprocess.CompletedProcess:
    """Run a copy of cluster/make-env.sh in tmp_path (it writes next to itself) with only `values` set."""
    script = tmp_path / "make-env.sh"
    script.write_text((REPO / "cluster" / "make-env.sh").read_text())
    # No PATH assumption: the script finds `ray` next to the Python it is given.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, **values}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)


def test_make_env_writes_a_private_env_file(tmp_path):
    values = {
        "MLFLOW_TRACKING_URI": "https://mlflow.example.org",
        "SCGPT_CHECKPOINT_URI": "gs://bucket/scgpt",
        "SCGPT_SHARED_NFS": "10.0.0.2:/share",
    }
    res = _make_env(tmp_path, **values)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "scgpt.env"
    assert out.stat().st_mode & 0o777 == 0o600
    written = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert written == {
        **values,
        "RAY_AUTH_MODE": "token",
        # The token the nodes get is the one this machine's `ray job submit` sends.
        "RAY_AUTH_TOKEN": (tmp_path / ".ray" / "auth_token").read_text().strip(),
    }


def test_make_env_refuses_missing_or_local_values(tmp_path):
    res = _make_env(tmp_path)
    assert res.returncode == 2
    assert "MLFLOW_TRACKING_URI SCGPT_CHECKPOINT_URI SCGPT_SHARED_NFS" in res.stderr
    res = _make_env(
        tmp_path,
        MLFLOW_TRACKING_URI="http://m",
        SCGPT_SHARED_NFS="h:/",
        SCGPT_CHECKPOINT_URI="/local/path",
    )
    assert res.returncode == 2 and "s3:// or gs://" in res.stderr
    assert not (tmp_path / "scgpt.env").exists()

"""Static checks of the container images in cluster/docker/ (docker builds cannot run here: no registry access).

Pins must match pyproject.toml, the project must be installed, the user must not be root, and the build context
must carry exactly what the Dockerfiles copy.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.conftest import REPO

DOCKER = REPO / "cluster" / "docker"
PROJECT_DIR = "/home/ray/scgpt-dist"  # where `ray start` runs in the launcher and KubeRay configs
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        op, _, args = line.partition(" ")
        out.append((op.upper(), " ".join(args.split())))
    return out


def args_of(path: Path) -> dict[str, str]:
    """ARG defaults (the last one of each name wins)."""
    found = {}
    for op, args in instructions(path):
        if op == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            found[name] = value
    return found


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def pin(name: str) -> str:
    """The `==` version pyproject.toml pins for a core dependency."""
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name} is not pinned in pyproject.toml"
            return spec.version
    raise AssertionError(f"{name} not in pyproject.toml")


IMAGES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}


def test_images_are_shipped():
    assert {p.name for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore"} == {
        "Dockerfile.cpu",
        "Dockerfile.gpu",
        "Dockerfile.submitter",
    }


@pytest.mark.parametrize("kind", IMAGES)
def test_torch_and_python_match_pyproject(kind):
    path = IMAGES[kind]
    args = args_of(path)
    assert args["TORCH_VERSION"] == pin("torch")
    runs = [expand(a, args) for op, a in instructions(path) if op == "RUN"]
    assert any(f'"torch=={pin("torch")}"' in r for r in runs)
    # One Python minor version across the cluster (Ray requires it), inside requires-python.
    assert args["PYTHON_VERSION"] == "3.11"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("3.11.0")


def test_cpu_image_is_cpu_only_and_slim():
    path = IMAGES["cpu"]
    args = args_of(path)
    froms = [expand(a, args) for op, a in instructions(path) if op == "FROM"]
    assert froms == ["python:3.11-slim-bookworm"]
    runs = " ".join(a for op, a in instructions(path) if op == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert "pip install ." in runs and "[gpu]" not in runs
    assert "flash" not in runs and "nvidia" not in path.read_text().lower()


def test_gpu_image_cuda_torch_and_flash_attn():
    path = IMAGES["gpu"]
    args = args_of(path)
    froms = [expand(a, args) for op, a in instructions(path) if op == "FROM"]
    cuda = args["CUDA_VERSION"]
    assert froms == [
        f"nvidia/cuda:{cuda}-cudnn-devel-ubuntu{args['UBUNTU_VERSION']} AS build",
        f"nvidia/cuda:{cuda}-cudnn-runtime-ubuntu{args['UBUNTU_VERSION']}",
    ]
    # The torch wheel index is the CUDA the base image carries (cu128 <-> 12.8.x).
    major, minor = cuda.split(".")[:2]
    assert args["TORCH_CUDA"] == f"cu{major}{minor}"
    runs = [expand(a, args) for op, a in instructions(path) if op == "RUN"]
    assert any(
        f'--index-url "https://download.pytorch.org/whl/cu{major}{minor}"' in r for r in runs
    )
    # flash-attn: the version built satisfies the `[gpu]` extra, and the project installs with that extra.
    (flash,) = (Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["gpu"])
    assert flash.name == "flash-attn"
    assert flash.specifier.contains(args["FLASH_ATTN_VERSION"])
    assert any(f'"flash-attn=={args["FLASH_ATTN_VERSION"]}"' in r for r in runs)
    assert any("--no-build-isolation" in r and "flash-attn" in r for r in runs)
    assert any('pip install ".[gpu]"' in r for r in runs)
    assert any("import torch, ray, deepspeed, flash_attn" in r for r in runs)


@pytest.mark.parametrize("kind", IMAGES)
def test_project_installed_as_non_root_in_project_dir(kind):
    path = IMAGES[kind]
    steps = instructions(path)
    users = [a for op, a in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert any(op == "RUN" and "useradd" in a and "--uid 1000" in a for op, a in steps)
    # The final stage's working directory is where Ray starts, so relative job config paths resolve.
    last_stage = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    assert [a for op, a in last_stage if op == "WORKDIR"][-1] == PROJECT_DIR
    copied = set()
    for op, a in last_stage:
        if op == "COPY" and "--from=" not in a:
            *sources, _dest = (tok for tok in a.split() if not tok.startswith("--"))
            copied.update(sources)
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    assert copied == packages | {"pyproject.toml", "README.md"}
    assert not re.search(r"^\s*ENV\s+.*(TOKEN|PASSWORD|SECRET|KEY)\w*=", path.read_text(), re.M)


@pytest.mark.parametrize("kind", IMAGES)
def test_build_context_sends_what_the_image_copies(kind):
    """<Dockerfile>.dockerignore (BuildKit) ignores everything except the copied sources."""
    path = IMAGES[kind]
    ignore = (DOCKER / f"{path.name}.dockerignore").read_text().splitlines()
    patterns = [p for p in (line.strip() for line in ignore) if p and not p.startswith("#")]

    def matches(pat: str, rel: str) -> bool:
        """Docker semantics: `*` stays within one path segment, `**` spans any, and a pattern that matches
        a directory applies to everything under it."""
        regex = re.escape(pat).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = rel.split("/")
        return any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1))

    def sent(rel: str) -> bool:
        keep = True
        for pat in patterns:
            if matches(pat.lstrip("!"), rel):
                keep = pat.startswith("!")
        return keep

    assert sent("pyproject.toml") and sent("README.md")
    assert sent("scgpt_dist/model/transformer.py") and sent("jobs/configs/cluster_1x8.yaml")
    assert not sent("outputs/demo/soma") and not sent(".git/config")
    assert not sent("cluster/scgpt.env"), "the env file with the Ray token must not enter the image"
    assert not sent("scgpt_dist/__pycache__/model.cpython-311.pyc")


def test_submitter_image_pins_and_verifies_kubectl():
    path = DOCKER / "Dockerfile.submitter"
    args = args_of(path)
    assert re.fullmatch(r"v1\.\d+\.\d+", args["KUBECTL_VERSION"])
    (run,) = [a for op, a in instructions(path) if op == "RUN" and "kubectl" in a]
    assert "/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl.sha256" in run
    assert "sha256sum --check" in run
    users = [a for op, a in instructions(path) if op == "USER"]
    assert users == ["65532"]  # the CronJob's runAsUser (tests/cluster/test_k8s.py)
    assert not [a for op, a in instructions(path) if op == "COPY"]

"""KubeRay manifests (cluster/k8s/): Kubernetes core kinds against the API schemas (kubernetes-validate), the
RayCluster / RayJob fields the project relies on, and the re-pretraining submitter script run against a fake
kubectl."""

from __future__ import annotations

import copy
import os
import re
import stat
import subprocess
import tomllib

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from scgpt_dist.config import load_config
from tests.conftest import REPO

K8S = REPO / "cluster" / "k8s"
K8S_VERSION = "1.30"  # oldest minor still supported by EKS and GKE when this was written
PROJECT_DIR = "/home/ray/scgpt-dist"
CPU_IMAGE = "ghcr.io/YOUR-ORG/scgpt-dist:cpu-0.1.0"
GPU_IMAGE = "ghcr.io/YOUR-ORG/scgpt-dist:gpu-0.1.0"
GPUS_PER_NODE = 8
RAY_KINDS = {"RayCluster", "RayJob"}


def _ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    return next(iter(ray.specifier)).version


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((str(path.relative_to(K8S)), doc))
    return out


DOCS = _docs()


def _by_kind(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind]


def _repretrain_configmap() -> dict:
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "scgpt-repretrain"]
    return cm


def _repretrain_rayjob() -> dict:
    return yaml.safe_load(_repretrain_configmap()["data"]["repretrain-rayjob.yaml"])


def _all_rayjobs() -> list[dict]:
    return _by_kind("RayJob") + [_repretrain_rayjob()]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(d["metadata"]["name"], d["spec"]) for d in _by_kind("RayCluster")]
    for job in _all_rayjobs():
        name = job["metadata"].get("name") or job["metadata"]["generateName"]
        specs.append((name, job["spec"]["rayClusterSpec"]))
    return specs


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]
    return [(name, g["template"]) for name, g in groups]


def _gpu_group(spec: dict) -> dict:
    (group,) = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    return group


def _cpu_request(container: dict) -> float:
    return float(container["resources"]["requests"]["cpu"])


# ------------------------------------------------------------------------------------ core kinds: API schemas


def test_manifests_present_and_namespace_applied_first():
    kinds = {d["kind"] for _, d in DOCS}
    assert kinds >= {
        "Namespace",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "ConfigMap",
        "CronJob",
        "RayCluster",
        "RayJob",
    }
    # `kubectl apply -f cluster/k8s/` applies files in name order, not recursing into jobs/.
    top = sorted(p.name for p in K8S.glob("*.yaml"))
    assert yaml.safe_load((K8S / top[0]).read_text())["kind"] == "Namespace"
    assert {d["kind"] for f, d in DOCS if f.startswith("jobs/")} == {"RayJob"}
    for _, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "scgpt"


@pytest.mark.parametrize(
    "where,doc",
    [(f, d) for f, d in DOCS if d["kind"] not in RAY_KINDS],
    ids=lambda x: x if isinstance(x, str) else x["kind"] + "/" + x["metadata"]["name"],
)
def test_core_kinds_validate_against_kubernetes_schema(where, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _as_pod(template: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata", {}),
        "spec": template["spec"],
    }


@pytest.mark.parametrize(
    "name,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_ray_pod_templates_are_valid_pods(name, spec):
    for _group, template in _pod_templates(spec):
        kubernetes_validate.validate(_as_pod(template), K8S_VERSION, strict=True)


def test_validation_catches_mistakes():
    """The schema checks above can fail."""
    (cron,) = _by_kind("CronJob")
    typo = copy.deepcopy(cron)
    typo["spec"]["schedul"] = typo["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    (_, spec) = _cluster_specs()[0]
    template = copy.deepcopy(_gpu_group(spec)["template"])
    template["spec"]["containers"][0]["resources"]["limits"] = ["nvidia.com/gpu=8"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_as_pod(template), K8S_VERSION, strict=True)


# ------------------------------------------------------------------------ RayCluster / RayJob: what we rely on


@pytest.mark.parametrize(
    "name,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_ray_cluster_spec(name, spec):
    assert spec["rayVersion"] == _ray_pin(), "the images run the Ray that pyproject.toml pins"
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert (
        "dashboard-host" not in head["rayStartParams"]
    )  # see 30-networkpolicy.yaml for why not loopback

    accounts = {d["metadata"]["name"] for d in _by_kind("ServiceAccount")}
    (policy,) = _by_kind("NetworkPolicy")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for group, template in _pod_templates(spec):
        pod = template["spec"]
        assert pod["serviceAccountName"] in accounts
        assert selected.items() <= template["metadata"]["labels"].items(), group
        (container,) = pod["containers"]
        assert container["workingDir"] == PROJECT_DIR
        assert {"configMapRef": {"name": "scgpt-env"}} in container["envFrom"]
        secret_refs = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
        assert all(s.get("optional") is True for s in secret_refs)
        assert "env" not in container, (
            "settings come from the scgpt-env ConfigMap, secrets from a Secret"
        )
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["shared"] == "/mnt/shared"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "scgpt-shared"
        res = container["resources"]
        assert res["requests"] == res["limits"], (
            "Guaranteed QoS: training pods are not evicted first"
        )

    assert head["template"]["spec"]["containers"][0]["image"] == CPU_IMAGE
    gpu = _gpu_group(spec)
    (gpu_container,) = gpu["template"]["spec"]["containers"]
    assert gpu_container["image"] == GPU_IMAGE
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == str(GPUS_PER_NODE)
    assert {"name": "dshm", "mountPath": "/dev/shm"} in gpu_container["volumeMounts"]
    cpu_groups = [g for g in spec["workerGroupSpecs"] if g is not gpu]
    assert cpu_groups, "CPU workers for Ray Data"
    for g in cpu_groups:
        (c,) = g["template"]["spec"]["containers"]
        assert c["image"] == CPU_IMAGE and "nvidia.com/gpu" not in c["resources"]["limits"]
    (pvc,) = _by_kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "scgpt-shared" and pvc["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def _readme_submit_entrypoints() -> set[str]:
    """Commands the README passes to `ray job submit ... --`."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return {
        " ".join(m.group(1).split())
        for m in re.finditer(r"ray job submit[^\n]*? -- +([^\n`]+)", text)
    }


@pytest.mark.parametrize("job", _by_kind("RayJob"), ids=lambda j: j["metadata"]["name"])
def test_pretrain_rayjob_runs_the_readme_command_at_the_right_size(job):
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    entrypoint = spec["entrypoint"]
    assert entrypoint in _readme_submit_entrypoints()
    m = re.fullmatch(
        r"python -m jobs\.pretrain --config (jobs/configs/cluster_\w+\.yaml)", entrypoint
    )
    assert m, entrypoint
    cfg = load_config(REPO / m.group(1))
    gpu = _gpu_group(spec["rayClusterSpec"])
    # A fixed-size job cluster with exactly the GPUs the preset's Ray Train workers ask for.
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"]
    assert cfg.train.use_gpu and cfg.train.num_workers == gpu["replicas"] * GPUS_PER_NODE
    (container,) = gpu["template"]["spec"]["containers"]
    assert cfg.train.cpus_per_worker * GPUS_PER_NODE <= _cpu_request(container)
    assert cfg.output_dir.startswith("/mnt/shared/")


def test_standing_raycluster_autoscales_gpu_nodes_from_zero():
    (cluster,) = _by_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu = _gpu_group(spec)
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 4  # room for cluster_4x8


# ----------------------------------------------------------------------------------- scheduled re-pretraining


def test_repretrain_cronjob_and_its_rayjob_template():
    (cron,) = _by_kind("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert (
        pod["securityContext"]["runAsUser"] == 65532
    )  # USER of cluster/docker/Dockerfile.submitter
    (container,) = pod["containers"]
    assert container["command"] == ["/bin/sh", "/etc/scgpt/submit.sh"]
    assert container["image"].endswith(":submitter-0.1.0")
    (templates,) = [v for v in pod["volumes"] if "configMap" in v]
    assert templates["configMap"]["name"] == _repretrain_configmap()["metadata"]["name"]
    assert "/etc/scgpt/repretrain-rayjob.yaml" in _repretrain_configmap()["data"]["submit.sh"]

    job = _repretrain_rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["generateName"].endswith("-") and "name" not in job["metadata"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # Planned entry point (issue 7); once jobs/repretrain exists its preset must exist too.
    m = re.fullmatch(
        r"python -m jobs\.repretrain --config (jobs/configs/\w+\.yaml)", job["spec"]["entrypoint"]
    )
    assert m
    if (REPO / "jobs" / "repretrain").is_dir():
        assert (REPO / m.group(1)).is_file()
    else:
        assert spec["suspend"] is True, (
            "no weekly GPU cluster for an entry point that does not exist yet"
        )

    # The submitter may create and watch RayJobs, nothing more.
    (binding,) = _by_kind("RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "scgpt"}
    ]
    (role,) = [r for r in _by_kind("Role") if r["metadata"]["name"] == binding["roleRef"]["name"]]
    assert role["rules"] == [
        {
            "apiGroups": ["ray.io"],
            "resources": ["rayjobs"],
            "verbs": ["create", "get", "list", "watch"],
        }
    ]


FAKE_KUBECTL = """#!/bin/sh
# Fake kubectl: logs its arguments, answers like the API server for one RayJob.
echo "$*" >> "$KUBECTL_LOG"
case "$1" in
  create) echo "rayjob.ray.io/scgpt-repretrain-x7k2q" ;;
  get)
    case "$*" in
      *jobDeploymentStatus*) n=$(cat "$STATE" 2>/dev/null || echo 0); echo $((n + 1)) > "$STATE"
                             if [ "$n" -ge 1 ]; then printf Complete; else printf Running; fi ;;
      *jobStatus*) printf "$FINAL_STATUS" ;;
    esac ;;
esac
"""


@pytest.mark.parametrize("final,code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_script_waits_for_the_rayjob_and_reports_its_status(tmp_path, final, code):
    script = tmp_path / "submit.sh"
    script.write_text(_repretrain_configmap()["data"]["submit.sh"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(stat.S_IRWXU)
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")  # the poll interval, skipped here
    (bin_dir / "sleep").chmod(stat.S_IRWXU)
    log = tmp_path / "kubectl.log"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KUBECTL_LOG": str(log),
        "STATE": str(tmp_path / "state"),
        "FINAL_STATUS": final,
    }
    res = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == code, res.stderr
    assert f"deployment Complete, job {final}" in res.stdout
    calls = log.read_text().splitlines()
    assert calls[0] == "create -f /etc/scgpt/repretrain-rayjob.yaml -o name"
    assert sum("jobDeploymentStatus" in c for c in calls) == 2  # polled until Complete
    assert all("rayjob.ray.io/scgpt-repretrain-x7k2q" in c for c in calls[1:])


# ----------------------------------------------------------------------------------------------- exposure


def test_nothing_exposed_outside_the_cluster_and_no_secrets():
    for _, doc in DOCS:
        assert doc["kind"] not in {"Ingress", "Secret", "Service"}
    text = "\n".join(p.read_text() for p in K8S.rglob("*.yaml"))
    assert "LoadBalancer" not in text and "NodePort" not in text and "hostNetwork" not in text
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)(password|token)\s*:\s*['\"]?\w{8,}", text)

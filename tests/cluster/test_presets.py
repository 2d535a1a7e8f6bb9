"""The cluster presets (jobs/configs/cluster_*.yaml) against the released scGPT whole-human setup and the clusters
they run on."""

from __future__ import annotations

import re

import pytest
import yaml

from scgpt_dist.config import load_config
from tests.conftest import REPO

PRESETS = {"cluster_1x8.yaml": 1, "cluster_4x8.yaml": 4}  # preset -> 8-GPU nodes
GPUS_PER_NODE = 8
GLOBAL_BATCH = 512


def test_presets_are_shipped():
    shipped = {p.name for p in (REPO / "jobs" / "configs").glob("cluster_*.yaml")}
    assert shipped == set(PRESETS)


@pytest.mark.parametrize("name,nodes", PRESETS.items())
def test_whole_human_scale_on_gpus(name, nodes):
    path = REPO / "jobs" / "configs" / name
    cfg = load_config(path)
    m, t = cfg.model, cfg.train
    assert (m.n_layers, m.d_model, m.n_heads, m.d_hid, m.dropout) == (12, 512, 8, 512, 0.2)
    assert cfg.data.tokenizer.max_seq_len == 1200 and m.n_bins == cfg.data.tokenizer.n_bins == 51
    assert m.attention == "flash"
    assert t.use_gpu and t.num_workers == nodes * GPUS_PER_NODE
    assert (t.precision, t.zero_stage, t.lr, t.warmup_steps) == ("bf16", 2, 1e-4, 10000)
    assert t.micro_batch_size * t.num_workers * t.grad_accum == GLOBAL_BATCH
    # The header comment documents the same arithmetic.
    comment = re.search(r"= (\d+) x (\d+) x (\d+) = (\d+) cells", path.read_text())
    assert comment and tuple(map(int, comment.groups())) == (
        t.micro_batch_size,
        t.num_workers,
        t.grad_accum,
        GLOBAL_BATCH,
    )
    assert cfg.output_dir.startswith("/mnt/shared/") and not cfg.data.build_demo
    assert cfg.data.source.soma_uri.startswith("s3://")
    assert cfg.mlflow.tracking_uri is None, "the tracking URI comes from $MLFLOW_TRACKING_URI"


@pytest.mark.parametrize("launcher", ["aws.yaml", "gcp.yaml"])
@pytest.mark.parametrize("name,nodes", PRESETS.items())
def test_preset_fits_the_launcher_gpu_nodes(launcher, name, nodes):
    cfg = load_config(REPO / "jobs" / "configs" / name)
    cluster = yaml.safe_load((REPO / "cluster" / launcher).read_text())
    (gpu,) = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu["max_workers"] >= nodes
    per_node = GPUS_PER_NODE * cfg.train.cpus_per_worker
    assert per_node <= gpu["resources"]["CPU"], "Ray Train workers must fit on one node's CPUs"

"""jobs.repretrain end to end on a local SOMA experiment, with real Ray Train + DeepSpeed, TileDB-SOMA and
MLflow (sqlite): first version -> promoted; a dataset with new genes is ingested -> re-pretraining is
interrupted, resumed under a gate that cannot pass -> not promoted; run again with the normal gate -> the same
candidate (not retrained) is promoted with a larger vocabulary; run again -> up to date; rollback -> hold.
Three training runs in all (first version, interrupted, resumed)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from data_ingest import keys
from data_ingest.ingest import ingest_h5ads
from data_ingest.soma_store import to_census_layout, write_experiment
from data_ingest.synth.small import SynthConfig, make_synthetic
from jobs import repretrain as job
from scgpt_dist.config import ExperimentConfig, dump_config, load_config
from scgpt_dist.train import registry
from scgpt_dist.train.checkpoint import find_latest_checkpoint
from tests.conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` skips it

MODEL = "scgpt-repretrain-test"
GENES = [f"G{i:04d}" for i in range(200)]
NEW_A = [f"NEWA{i:02d}" for i in range(20)]


def _counts(n_cells: int, genes: list[str], seed: int, n_batches: int = 1):
    adata = make_synthetic(
        SynthConfig(n_cells=n_cells, n_batches=n_batches, markers_per_type=15, seed=seed),
        gene_names=genes,
    )
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


@pytest.fixture(scope="module")
def scenario(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("repretrain")
    base = _counts(300, GENES, seed=0, n_batches=3)
    parts = [
        to_census_layout(base[base.obs["batch"] == b].copy(), f"ds_{b}", "cell_type", "counts")
        for b in sorted(base.obs["batch"].unique())
    ]
    soma = write_experiment(root / "soma", parts)
    overrides = [
        f"output_dir={root / 'out'}",
        f"data.source.soma_uri={soma}",
        "data.source.layer=raw",
        "data.source.holdout_fraction=0.2",
        "data.build_demo=false",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"mlflow.registered_model={MODEL}",
        "mlflow.system_metrics=false",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "repretrain.gate.eval_cells=200",
    ]

    def run(*extra):
        return job.repretrain(job.load_repretrain_config(TINY_CONFIG, overrides + list(extra)))

    def ingest(name: str, genes: list[str], seed: int):
        path = root / f"{name}.h5ad"
        _counts(120, genes, seed=seed).write_h5ad(path)
        ingest_h5ads(soma, [path], layer="raw")

    out = {"root": root, "soma": soma, "overrides": overrides}
    out["v1"] = run()
    ingest("new_a", GENES[:150] + NEW_A, seed=1)
    out["interrupted"] = run("train.stop_after_steps=2")
    latest = find_latest_checkpoint(out["interrupted"].run_dir / job.TRAIN_DIR)
    out["checkpoint_after_interrupt"] = None if latest is None else latest.name
    # Resumed from the CLI, as a scheduler runs it, under a gate that cannot pass.
    client = out["client"] = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    printed = io.StringIO()
    impossible = "repretrain.gate.max_new_loss_ratio=0.0"
    with contextlib.redirect_stdout(printed):
        out["rejected_code"] = job.main(["--config", str(TINY_CONFIG), *overrides, impossible])
    out["rejected_stdout"] = printed.getvalue()
    out["champion_after_reject"] = str(_champion(client).version)
    out["versions_after_reject"] = len(client.search_model_versions(f"name = '{MODEL}'"))
    out["v2"] = run()
    return out


def _champion(client):
    return client.get_model_version_by_alias(MODEL, "champion")


def test_first_version_is_pretrained_and_promoted(scenario):
    v1 = scenario["v1"]
    assert v1.code == job.EXIT_OK, v1.message
    assert v1.state.base_version is None and v1.state.candidate_version == "1"
    assert v1.state.metrics["old"]["n_cells"] > 30  # the fixed held-out set
    assert "new" not in v1.state.metrics
    first = scenario["client"].get_model_version(MODEL, "1")
    assert first.tags[registry.TAG_DATA_VERSION].startswith("ingest-0-")
    assert first.tags[registry.TAG_VOCAB_SIZE] == str(len(GENES) + len(keys.SPECIAL_TOKENS))


def test_new_dataset_is_warm_started_replayed_gated_and_promoted(scenario):
    from safetensors.torch import load_file

    from data_ingest.vocab import GeneVocab
    from scgpt_dist.train.warmstart import GENE_EMBEDDING

    interrupted, v2 = scenario["interrupted"], scenario["v2"]
    assert v2.code == job.EXIT_OK, v2.message
    assert v2.run_dir == interrupted.run_dir  # every run continued the same attempt
    steps = [s for s, _ in v2.state.history]
    # Trained once (resumed after the interruption), rejected, then re-decided and promoted.
    assert steps == [
        job.PLANNED,
        job.TRAINED,
        job.EVALUATED,
        job.REJECTED,
        job.REGISTERED,
        job.PROMOTED,
    ]
    assert v2.state.base_version == "1" and v2.state.new_datasets == ["new_a"]
    client = scenario["client"]
    champion = _champion(client)
    assert str(champion.version) == "2" and champion.tags[registry.TAG_PREVIOUS_VERSION] == "1"
    assert champion.tags[registry.TAG_DATA_VERSION].startswith("ingest-1-")
    old_vocab = GeneVocab.load(v2.run_dir / job.PROMOTED_DIR / keys.VOCAB_FILE)
    new_vocab = GeneVocab.load(v2.state.model_dir + "/" + keys.VOCAB_FILE)
    assert (
        len(new_vocab) == len(old_vocab) + len(NEW_A) == int(champion.tags[registry.TAG_VOCAB_SIZE])
    )
    assert all(new_vocab[t] == i for t, i in old_vocab.to_dict().items())  # ids unchanged
    # Warm start: known rows copied, new rows near the mean of the old gene rows.
    promoted = load_file(str(v2.run_dir / job.PROMOTED_DIR / keys.MODEL_FILE))
    init = load_file(str(v2.run_dir / job.INIT_DIR / keys.MODEL_FILE))
    n_old = len(old_vocab)
    assert np.array_equal(init[GENE_EMBEDDING][:n_old].numpy(), promoted[GENE_EMBEDDING].numpy())
    gene_rows = promoted[GENE_EMBEDDING][len(keys.SPECIAL_TOKENS) :]
    new_rows = init[GENE_EMBEDDING][n_old:]
    assert (new_rows - gene_rows.mean(0)).abs().max() < 0.6 * gene_rows.std(0).max()
    # Training continued from the promoted weights: it moved them, but little (a fresh start would not
    # be anywhere near them).
    cand = load_file(str(v2.state.model_dir + "/" + keys.MODEL_FILE))
    name = "transformer_encoder.layers.0.linear1.weight"
    moved = (cand[name] - promoted[name]).norm()
    assert 0 < moved < 0.5 * promoted[name].norm()
    # New cells plus a replay sample of the old ones.
    meta = json.loads((v2.run_dir / job.TRAIN_DIR / "model" / keys.META_FILE).read_text())
    replay = meta["data"]["replay"]
    assert replay["new_cells"] > 0 and 0 < replay["replay_cells"] < replay["old_cells"]
    assert abs(replay["replay_cells"] / replay["old_cells"] - 0.25) < 0.1
    assert meta["data"]["n_train_cells"] == replay["new_cells"] + replay["replay_cells"]
    # The gate compared both models on old and new held-out cells.
    m = v2.state.metrics
    assert m["old"]["n_cells"] > 0 and m["new"]["n_cells"] > 0
    assert {"candidate_mse", "promoted_mse"} <= set(m["new"]) and {"candidate", "promoted"} <= set(
        m["knn"]
    )
    assert v2.state.gate["passed"] and all(r.startswith("ok:") for r in v2.state.gate["reasons"])
    run = client.get_run(v2.state.run_id)
    assert run.data.tags["gate.passed"] == "True" and "gate.new.candidate_mse" in run.data.metrics


def test_second_run_is_a_noop(scenario, capsys):
    versions = len(scenario["client"].search_model_versions(f"name = '{MODEL}'"))
    runs = sorted(p.name for p in (scenario["root"] / "out" / job.RUNS_DIR).iterdir())
    code = job.main(["--config", str(TINY_CONFIG), *scenario["overrides"]])
    assert code == job.EXIT_OK
    assert "up to date" in capsys.readouterr().out
    assert len(scenario["client"].search_model_versions(f"name = '{MODEL}'")) == versions
    assert sorted(p.name for p in (scenario["root"] / "out" / job.RUNS_DIR).iterdir()) == runs


def test_interrupted_run_resumes_and_a_failed_gate_keeps_the_promoted_model(scenario):
    interrupted = scenario["interrupted"]
    assert interrupted.code == job.EXIT_FAILED and "run again" in interrupted.message
    assert interrupted.state.step == job.PLANNED
    assert scenario["checkpoint_after_interrupt"] == "step_00000002"
    assert scenario["rejected_code"] == job.EXIT_GATE_FAILED
    printed = scenario["rejected_stdout"]
    assert "not promoted" in printed and "stays at version 1" in printed
    assert "FAIL: new-data GEP MSE" in printed
    assert scenario["champion_after_reject"] == "1"
    assert scenario["versions_after_reject"] == 1  # nothing registered, nothing half-registered
    run = scenario["client"].get_run(scenario["v2"].state.run_id)
    assert run.data.tags["resumed_from"].endswith(
        "step_00000002"
    )  # training resumed, not restarted


def test_registration_and_promotion_are_idempotent(scenario):
    client = scenario["client"]
    v2 = scenario["v2"].state
    again = registry.register_candidate(client, MODEL, v2.run_id, {"x": "y"})
    assert str(again.version) == "2"  # found by run id, not registered twice
    champion = _champion(client).version
    assert registry.promote(client, MODEL, "champion", champion, expected="1") is False
    with pytest.raises(registry.PromotionConflict):
        registry.promote(client, MODEL, "champion", "1", expected="1")
    assert _champion(client).version == champion


def test_rollback_moves_the_alias_back_and_holds(scenario, capsys):
    client = scenario["client"]
    args = ["--config", str(TINY_CONFIG), *scenario["overrides"]]
    current = _champion(client).version
    assert job.main([*args, "--rollback", "bad embeddings"]) == job.EXIT_OK
    previous = client.get_model_version(MODEL, current).tags[registry.TAG_PREVIOUS_VERSION]
    assert str(_champion(client).version) == previous
    assert job.main(args) == job.EXIT_OK
    assert "on hold" in capsys.readouterr().out
    assert job.main([*args, "--release"]) == job.EXIT_OK
    assert registry.hold_reason(client, MODEL) is None


# ------------------------------------------------------------------------------ data versions (no training)


CENSUS_DIRECTORY = {  # the shape get_census_version_directory() returns (see its docstring)
    "stable": {"release_build": "2025-01-30", "flags": {"lts": True, "retracted": False}},
    "latest": {"release_build": "2025-11-08", "flags": {"lts": False, "retracted": False}},
    "V2": {"release_build": "2025-01-30", "flags": {"lts": True, "retracted": False}},
    "2025-11-08": {"release_build": "2025-11-08", "flags": {"lts": False, "retracted": False}},
    "2025-01-30": {"release_build": "2025-01-30", "flags": {"lts": True, "retracted": False}},
    "2024-07-01": {"release_build": "2024-07-01", "flags": {"lts": True, "retracted": False}},
    "2025-06-01": {"release_build": "2025-06-01", "flags": {"lts": True, "retracted": True}},
}


def test_newest_census_version_lts_by_default():
    assert registry.newest_census_version(CENSUS_DIRECTORY) == "2025-01-30"
    assert registry.newest_census_version(CENSUS_DIRECTORY, lts_only=False) == "2025-11-08"
    with pytest.raises(ValueError, match="no LTS release"):
        registry.newest_census_version({"latest": CENSUS_DIRECTORY["latest"]})
    target = registry.census_data_version("2025-01-30")
    assert job._is_newer(
        target, {registry.TAG_DATA_VERSION: "2024-07-01", "census_version": "2024-07-01"}
    )
    assert not job._is_newer(target, {registry.TAG_DATA_VERSION: "2025-01-30"})
    assert not job._is_newer(target, {"data_version": "2025-11-08", "census_version": "2025-11-08"})


def test_ingest_log_versions(tmp_path):
    uri = tmp_path / "exp"
    log_file = tmp_path / "exp.ingest_log.json"
    v0 = registry.local_data_version(uri)
    assert v0.version.startswith("ingest-0-") and v0.datasets == []
    entries = [{"sha256": "a" * 64, "dataset_id": "d1"}, {"sha256": "b" * 64, "dataset_id": "d2"}]
    log_file.write_text(json.dumps(entries[:1]))
    v1 = registry.local_data_version(uri)
    log_file.write_text(json.dumps(entries))
    v2 = registry.local_data_version(uri)
    assert v1.version.startswith("ingest-1-") and v2.version.startswith("ingest-2-")
    assert registry.new_ingested_datasets(uri, v1.tags()) == ["d2"]
    assert registry.new_ingested_datasets(uri, v0.tags()) == ["d1", "d2"]
    log_file.write_text(json.dumps([{"sha256": "c" * 64, "dataset_id": "x"}, entries[1]]))
    with pytest.raises(ValueError, match="rewritten"):
        registry.new_ingested_datasets(uri, v1.tags())
    with pytest.raises(ValueError, match="ingest_log_entries"):
        registry.new_ingested_datasets(uri, {"data_version": "s3://x"})


@pytest.mark.parametrize("name", ["repretrain.yaml", "repretrain_cluster.yaml"])
def test_repretrain_presets_load_and_the_candidate_config_is_a_plain_experiment(name, tmp_path):
    cfg = job.load_repretrain_config(REPO / "jobs" / "configs" / name)
    assert isinstance(cfg, job.RepretrainExperiment) and cfg.repretrain.gate.eval_cells > 0
    plain = cfg.experiment()
    assert type(plain) is ExperimentConfig and "repretrain:" not in dump_config(plain)
    (tmp_path / "c.yaml").write_text(dump_config(plain))
    assert (
        load_config(tmp_path / "c.yaml") == plain
    )  # what pretraining workers and checkpoints read
    with pytest.raises(ValueError, match="data_versions"):
        job.load_repretrain_config(None, ["repretrain.data_versions=weekly"])

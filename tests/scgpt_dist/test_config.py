from pathlib import Path

import pytest

from scgpt_dist.config import (
    ConfigError,
    ExperimentConfig,
    dump_config,
    load_config,
    saved_config,
    to_dict,
)

# Job presets with their own schema (sweeps, scale ablations, re-pretraining) are loaded by
# tests/jobs/test_sweep.py, test_scale_ablation.py and test_repretrain.py; every other YAML here is an
# experiment config.
JOB_PRESET_PREFIXES = ("sweep_", "scale_ablation_", "repretrain")
CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml")
    if not p.name.startswith(JOB_PRESET_PREFIXES)
)


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    dumped = tmp_path / "c.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_a_saved_config_from_before_the_job_sections_moved_out_still_loads():
    saved = to_dict(load_config(None))
    saved["repretrain"] = {
        "alias": "champion",
        "gate": {"eval_cells": 2000},
    }  # older model dirs have it
    assert saved_config(saved) == load_config(None)
    with pytest.raises(ConfigError, match="unknown config key 'repretrain'"):
        load_config(None, ["repretrain.alias=x"])  # a new experiment config has no such section


def test_a_saved_config_with_the_parquet_cache_key_still_loads():
    saved = to_dict(load_config(None))
    cache = saved["data"]["stream"]["token_cache"]
    cache["row_group_cells"] = (
        cache.pop("record_batch_cells") // 2
    )  # written before the Arrow cache
    assert saved_config(saved).data.stream.token_cache.record_batch_cells == 128
    assert "row_group_cells" in cache  # the parsed dict is left as it was


def test_a_saved_config_from_before_the_stratified_order_resumes_the_random_one():
    saved = to_dict(load_config(None))
    assert saved["data"]["stream"].pop("chunk_order") == "stratified"  # the default now
    assert saved_config(saved).data.stream.chunk_order == "random"
    saved["data"]["stream"]["chunk_order"] = "stratified"
    assert saved_config(saved).data.stream.chunk_order == "stratified"


def test_overrides_and_types():
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "model.n_layers=2",
            "data.source.value_filter=a == 1",
            "train.stop_after_steps=null",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layers == 2 and cfg.data.source.value_filter == "a == 1"
    assert cfg.train.stop_after_steps is None
    # A census version looks like a date to YAML; a string field keeps it as the string the user wrote.
    assert load_config(
        None, ["data.source.census_version=2025-01-30"]
    ).data.source.census_version == ("2025-01-30")


def test_unknown_keys_and_bad_values():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.lrr'; did you mean 'train.lr'"
    ):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(None, ["modle.d_model=8"])
    with pytest.raises(ConfigError, match="train.max_steps must be int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="n_bins"):
        load_config(None, ["model.n_bins=11"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="needs data.tokenizer.thinned_view"):
        load_config(None, ["objectives.cce=1", "objectives.cce_view=thinned"])
    with pytest.raises(ConfigError, match="keep probability"):
        load_config(None, ["data.tokenizer.thinned_view=1.5"])
    with pytest.raises(ConfigError, match=r"train.on_node_drain='restart'; choose one of"):
        load_config(None, ["train.on_node_drain=restart"])
    with pytest.raises(ConfigError, match="no config file"):
        load_config("does/not/exist.yaml")

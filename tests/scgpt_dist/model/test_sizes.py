"""Named model sizes: one table that configs, the model benchmark and the scale ablation read."""

import pytest

from jobs.bench.model import PRESETS
from jobs.scale_ablation.config import ModelSize
from scgpt_dist.config import ConfigError, from_dict, load_config
from scgpt_dist.model import ModelConfig, build_model
from scgpt_dist.model.sizes import SIZES
from tests.conftest import REPO


def test_a_size_fills_the_shape_and_explicit_fields_win():
    cfg = load_config(None, ["model.size=demo", "model.d_hid=96"]).model
    assert (cfg.size, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_hid) == ("demo", 64, 4, 3, 96)
    assert ModelConfig.of_size("tiny", dropout=0.0).d_model == 32
    assert from_dict(ModelSize, {"name": "xs", "size": "xs"}).d_model == SIZES["xs"]["d_model"]
    with pytest.raises(
        ConfigError, match="model.size='huge' is not a named size; choose one of xs, tiny"
    ):
        load_config(None, ["model.size=huge"])


def test_presets_refer_to_sizes_by_name():
    assert load_config(REPO / "jobs" / "configs" / "demo.yaml").model.size == "demo"
    assert load_config(REPO / "jobs" / "configs" / "tiny.yaml").model.size == "tiny"
    human = SIZES["whole-human"]
    assert (PRESETS["whole-human"]["d_model"], PRESETS["whole-human"]["layers"]) == (
        human["d_model"],
        human["n_layers"],
    )


def test_parameter_counts_with_and_without_embedding_tables():
    model = build_model(ModelConfig.of_size("xs", n_batches=2), 50, 0)
    tables = sum(
        p.numel()
        for m in model.modules()
        if m.__class__.__name__ == "Embedding"
        for p in m.parameters()
    )
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(embeddings=False) == model.num_params() - tables > 0

"""Optimizer parameter groups and learning-rate schedules."""

import math

import pytest
import torch

from scgpt_dist.config import ModelConfig, TrainConfig
from scgpt_dist.model import build_model
from scgpt_dist.train_module import lr_lambda, param_groups


def test_schedules():
    cos = lr_lambda(TrainConfig(warmup_steps=10, max_steps=110, lr_schedule="cosine"))
    const = lr_lambda(TrainConfig(warmup_steps=10, max_steps=110, lr_schedule="constant"))
    wsd = lr_lambda(
        TrainConfig(warmup_steps=10, max_steps=110, lr_schedule="wsd", decay_fraction=0.2)
    )
    for fn in (cos, const, wsd):  # same linear warmup
        assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(110) == pytest.approx(0.1)
    assert all(const(s) == 1.0 for s in range(10, 200))
    # wsd: flat until 110 - 22 = 88, then linear to min_lr_ratio at max_steps.
    assert wsd(50) == 1.0 and wsd(88) == 1.0
    assert wsd(99) == pytest.approx(1.0 - 0.9 * 11 / 22)
    assert wsd(110) == pytest.approx(0.1) and wsd(150) == pytest.approx(0.1)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_no_decay_on_norms_biases_and_embeddings():
    model = build_model(
        ModelConfig(d_model=16, n_heads=2, n_layers=1, d_hid=32, n_batches=2), 20, 0
    )
    decay, keep = param_groups(model, TrainConfig(weight_decay=0.1))
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in decayed
    assert "encoder.embedding.weight" in kept and "batch_encoder.embedding.weight" in kept
    assert "encoder.enc_norm.weight" in kept and "decoder.fc.0.bias" in kept
    assert decayed.isdisjoint(kept) and len(decayed) + len(kept) == len(names)
    (every,) = param_groups(model, TrainConfig(weight_decay=0.1, weight_decay_all=True))
    assert len(every["params"]) == len(names)
    # AdamW honours the groups: with lr 0 only decay would move weights, and the kept ones do not move.
    opt = torch.optim.AdamW(param_groups(model, TrainConfig(weight_decay=0.5)), lr=1.0)
    before = model.encoder.embedding.weight.detach().clone()
    wqkv = model.transformer_encoder.layers[0].self_attn.Wqkv.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.encoder.embedding.weight.detach(), before)
    torch.testing.assert_close(
        model.transformer_encoder.layers[0].self_attn.Wqkv.weight.detach(), wqkv * 0.5
    )

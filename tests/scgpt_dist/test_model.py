import logging

import pytest
import torch

from data_ingest import keys
from scgpt_dist.attention import resolve_backend
from scgpt_dist.collate import mask_values
from scgpt_dist.config import ModelConfig, ObjectiveConfig
from scgpt_dist.losses import masked_mse, total_loss
from scgpt_dist.model import build_model

N_TOKENS, PAD = 50, 0


def _batch(b=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    genes = torch.randint(3, N_TOKENS, (b, length), generator=g)
    genes[:, 0] = 1  # <cls>
    values = torch.randint(1, 51, (b, length), generator=g).float()
    values[:, 0] = keys.PAD_VALUE
    padding = torch.zeros(b, length, dtype=torch.bool)
    padding[1, 8:] = True
    genes[padding] = PAD
    values[padding] = keys.PAD_VALUE
    return genes, values, padding, torch.tensor([0, 1, 0])


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=2, d_hid=32, dropout=0.0, n_batches=2, **kw)
    return build_model(cfg, N_TOKENS, PAD).eval()


def test_output_shapes():
    genes, values, padding, batch = _batch()
    out = _model()(genes, values, padding, batch)
    assert out["cell_emb"].shape == (3, 16)
    assert out["gep"].shape == out["gepc"].shape == (3, 12)


def test_padding_changes_nothing():
    genes, values, padding, batch = _batch()
    model = _model()
    short = model(genes[1:2, :8], values[1:2, :8], padding[1:2, :8], batch[1:2])
    padded = model(genes[1:2], values[1:2], padding[1:2], batch[1:2])
    torch.testing.assert_close(short["cell_emb"], padded["cell_emb"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short["gep"], padded["gep"][:, :8], atol=1e-5, rtol=1e-5)


def test_batch_labels_optional():
    genes, values, padding, _ = _batch()
    out = _model(use_batch_labels=False)(genes, values, padding)
    assert out["gep"].shape == (3, 12)
    with pytest.raises(ValueError, match="pass `batch`"):
        _model()(genes, values, padding)


def test_mask_values_never_touches_cls_or_padding():
    _, values, padding, _ = _batch(b=3, length=12)
    masked, mask = mask_values(values, 0.5, torch.Generator().manual_seed(0))
    assert not mask[:, 0].any() and not mask[padding].any()
    assert mask.sum(1).tolist() == [5, 3, 5]  # int(11 * 0.5), int(7 * 0.5), int(11 * 0.5)
    assert (masked[mask] == keys.MASK_VALUE).all()
    assert torch.equal(masked[~mask], values[~mask])


def test_losses():
    pred = torch.tensor([[1.0, 2.0, 3.0]])
    target = torch.tensor([[1.0, 4.0, 0.0]])
    mask = torch.tensor([[False, True, True]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((4 + 9) / 2)
    out = {"gep": pred, "gepc": pred * 0}
    total, parts = total_loss(out, target, mask, ObjectiveConfig(gep=1.0, gepc=0.5))
    assert parts["gepc"].item() == pytest.approx(16 / 2)
    assert total.item() == pytest.approx(6.5 + 0.5 * 8)
    total, parts = total_loss(out, target, mask, ObjectiveConfig(gep=1.0, gepc=0.0))
    assert set(parts) == {"gep"}


def test_attention_backends(caplog):
    assert resolve_backend("sdpa") == "sdpa"
    resolve_backend.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("flash") == "sdpa"  # no GPU here
    assert "using PyTorch SDPA" in caplog.text
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers")

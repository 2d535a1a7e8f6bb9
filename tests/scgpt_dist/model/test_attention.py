"""Attention backends: the CPU math path (dropout, workspace), packing, and the same outputs on every backend."""

import pytest
import torch

from data_ingest import keys
from scgpt_dist.config import ModelConfig
from scgpt_dist.model.attention import (
    WORKSPACE,
    Workspace,
    attention_math,
    dropout_keep_mask,
    mask_bias,
)
from scgpt_dist.model.packing import Packing
from scgpt_dist.model.transformer import build_model

N_TOKENS, PAD = 50, 0


def _qkv(shape=(2, 2, 6, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)
    )


def _reference_attention(q, k, v, allowed, keep, p):
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) * keep / (1 - p)) @ v


def test_math_path_is_masked_softmax_with_inverted_dropout():
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    allowed = (torch.rand(2, 1, 6, 6, generator=g) > 0.3) | torch.eye(6, dtype=torch.bool)
    keep = (torch.rand(2, 2, 6, 6, generator=g) >= 0.25).double()
    bias = mask_bias(allowed, torch.float64)
    out = attention_math(q, k, v, bias, 0.25, keep.clone())
    expected = _reference_attention(q, k, v, allowed, keep, 0.25)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    # the hand-written backward is the true gradient (with a fixed dropout mask and padding mask)
    with WORKSPACE.disabled():
        assert torch.autograd.gradcheck(
            lambda q, k, v: attention_math(q, k, v, bias, 0.25, keep.clone()), (q, k, v)
        )
        assert torch.autograd.gradcheck(
            lambda q, k, v: attention_math(q, k, v, None, 0.0), (q, k, v)
        )


def test_dropout_keep_mask_rate_and_scale():
    torch.manual_seed(0)
    keep, scale = dropout_keep_mask((400, 1000), 0.2)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(1 - keep.mean().item() - 0.2) < 0.003  # 400k draws: sd 6e-4
    assert scale == pytest.approx(1 / (1 - 13107 / 65536))  # p rounded to 2**-16
    # each of the 4 int16 lanes of a draw is used: no lane stuck or correlated with another
    lanes = keep.view(-1, 2, 2).float().mean((0, 1))
    assert (lanes - 0.8).abs().max() < 0.01
    odd, _ = dropout_keep_mask((3, 5, 7), 0.5)  # sizes that are not a multiple of 4
    assert odd.shape == (3, 5, 7) and set(odd.unique().tolist()) <= {0.0, 1.0}


def test_workspace_reuses_buffers_and_refuses_a_second_backward():
    WORKSPACE.clear()
    q, k, v = _qkv(dtype=torch.float32)
    out = attention_math(q, k, v, None, 0.5)
    assert WORKSPACE.held_bytes == 0  # both weight buffers are held for the backward
    out.sum().backward()
    held = WORKSPACE.held_bytes
    assert held == 3 * 2 * 2 * 6 * 6 * 4  # weights, dropped weights, their gradient: given back
    grad = q.grad.clone()
    q.grad = None
    attention_math(q, k, v, None, 0.5).sum().backward()  # reuses them
    assert WORKSPACE.held_bytes == held
    assert not torch.equal(q.grad, grad)  # a fresh dropout mask
    out = attention_math(q, k, v, None, 0.5)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="WORKSPACE.disabled"):
        out.sum().backward()
    with torch.no_grad():
        WORKSPACE.clear()
        attention_math(q, k, v, None, 0.5)
        assert WORKSPACE.held_bytes == 2 * 2 * 2 * 6 * 6 * 4  # no backward: given back at once


def test_dense_packing_is_a_view():
    padding = torch.zeros(2, 5, dtype=torch.bool)
    packing = Packing.from_padding(padding)
    x = torch.randn(2, 5, 3)
    assert packing.dense and packing.pack(x).data_ptr() == x.data_ptr()
    assert packing.unpack(packing.pack(x)).data_ptr() == x.data_ptr()
    padding[1, 3:] = True
    packing = Packing.from_padding(padding)
    assert not packing.dense
    assert packing.unpack(packing.pack(x))[1, 3:].abs().sum() == 0


def test_length_groups():
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[1, 4:] = True  # lengths 6, 4, 6, 6: cells 0, 2, 3 share a call
    packing = Packing.from_padding(padding)
    groups = packing.length_groups()
    assert [(n, rows is None) for n, rows, _ in groups] == [(6, False), (4, True)]
    assert groups[0][1].tolist() == list(range(0, 6)) + list(range(10, 22))
    assert Packing.from_padding(torch.zeros(3, 4, dtype=torch.bool)).length_groups() == [
        (4, None, slice(0, 12))
    ]


# ------------------------------------------------------------------------- same weights, same outputs


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    genes = torch.randint(3, N_TOKENS, (3, 12), generator=g)
    genes[:, 0] = 1
    values = torch.randint(1, 51, (3, 12), generator=g).float()
    values[:, 0] = keys.PAD_VALUE
    padding = torch.zeros(3, 12, dtype=torch.bool)
    padding[1, 8:] = True
    genes[padding] = PAD
    values[padding] = keys.PAD_VALUE
    gen = (torch.rand(3, 12, generator=g) < 0.4) & ~padding
    gen[:, 0] = False
    return genes, values.masked_fill(gen, float(keys.MASK_VALUE)), padding, gen


def _models(dropout=0.0):
    models = {}
    for backend in ("sdpa", "flex", "varlen"):
        torch.manual_seed(0)
        cfg = ModelConfig(
            d_model=16, n_heads=2, n_layers=2, d_hid=32, dropout=dropout, use_batch_labels=False
        )
        cfg.attention = backend
        models[backend] = build_model(cfg, N_TOKENS, PAD)
    return models


@pytest.mark.parametrize("generative", [False, True])
def test_sdpa_flex_and_varlen_give_the_same_outputs(generative):
    """FlexAttention (block mask: same cell + generative rule) vs SDPA with a boolean mask vs varlen."""
    genes, values, padding, gen = _batch()
    gen_mask = gen if generative else None
    outs = {}
    with torch.no_grad():  # FlexAttention has no CPU backward: inference here
        for name, model in _models().items():
            outs[name] = model.eval()(genes, values, padding, gen_mask=gen_mask)
    keep = ~padding
    for name in ("flex", "varlen"):
        torch.testing.assert_close(
            outs[name]["cell_emb"], outs["sdpa"]["cell_emb"], atol=1e-5, rtol=0
        )
        for key in ("gep", "gepc"):
            torch.testing.assert_close(
                outs[name][key][keep], outs["sdpa"][key][keep], atol=1e-5, rtol=0
            )
    if generative:  # the mask matters: without it the outputs differ
        with torch.no_grad():
            plain = _models()["sdpa"].eval()(genes, values, padding)
        assert (plain["gep"][keep] - outs["flex"]["gep"][keep]).abs().max() > 1e-3


def test_backends_same_gradients_in_training():
    """Training on CPU (flex falls back to varlen there): same loss gradients on every backend."""
    genes, values, padding, gen = _batch()
    grads = {}
    for name, model in _models().items():
        out = model.train()(genes, values, padding, gen_mask=gen)
        (out["gep"][gen].square().mean() + out["cell_emb"].sum()).backward()
        grads[name] = model.transformer_encoder.layers[0].self_attn.Wqkv.weight.grad
    torch.testing.assert_close(grads["varlen"], grads["sdpa"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["flex"], grads["sdpa"], atol=1e-5, rtol=1e-4)


def test_dropout_training_step_runs_the_math_path_on_every_backend():
    """With attention dropout each backend draws its own mask; gradients flow and differ from eval."""
    genes, values, padding, gen = _batch()
    for model in _models(dropout=0.3).values():
        torch.manual_seed(1)
        out = model.train()(genes, values, padding, gen_mask=gen)
        out["gep"][gen].square().mean().backward()
        grad = model.encoder.embedding.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_workspace_serves_smaller_requests_and_caps_what_it_keeps():
    ws = Workspace(max_bytes=100_000 * 4)
    cpu = torch.device("cpu")
    big = ws.take(60_000, torch.float32, cpu)
    ws.give(big.view(200, 300))
    smaller = ws.take(40_000, torch.float32, cpu)  # a shorter batch reuses the longer one's buffer
    assert smaller.data_ptr() == big.data_ptr() and smaller.numel() == 40_000
    ws.give(smaller)
    tiny = ws.take(20_000, torch.float32, cpu)
    assert (
        tiny.data_ptr() != big.data_ptr() and ws.held_bytes == 60_000 * 4
    )  # not over twice the size
    ws.give(torch.empty(50_000))  # another free buffer: 110k elements > 100k
    assert ws.held_bytes == 50_000 * 4  # the oldest (60k) went

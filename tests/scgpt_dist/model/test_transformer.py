import logging

import pytest
import torch

from data_ingest import keys
from scgpt_dist.config import ModelConfig, ObjectiveConfig
from scgpt_dist.model.attention import dropout_keep_mask, resolve_backend, sdpa
from scgpt_dist.model.collate import draw_mask_ratio, mask_values
from scgpt_dist.model.heads import ClsDecoder
from scgpt_dist.model.layers import CategoryValueEncoder
from scgpt_dist.model.losses import masked_mse, total_loss
from scgpt_dist.model.packing import generative_mask
from scgpt_dist.model.transformer import PERT_PAD_ID, build_model

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


# ------------------------------------------------------------------------- attention paths and generative mask


def _gen_mask(padding, seed=1):
    g = torch.Generator().manual_seed(seed)
    gen = torch.rand(padding.shape, generator=g) < 0.4
    gen[:, 0] = False  # <cls> is always a prompt token
    return gen & ~padding


def _same_weights(**kw):
    """Two models with identical weights that differ only in `kw`."""
    base = _model()
    other = _model(**kw)
    other.load_state_dict(base.state_dict())
    return base, other


def _assert_outputs_close(a, b, padding):
    keep = ~padding
    torch.testing.assert_close(a["cell_emb"], b["cell_emb"], atol=1e-5, rtol=1e-5)
    for k in ("gep", "gepc"):
        torch.testing.assert_close(a[k][keep], b[k][keep], atol=1e-5, rtol=1e-5)


def test_sdpa_and_varlen_backends_agree():
    genes, values, padding, batch = _batch()
    sdpa, varlen = _same_weights(attention="varlen")
    gen = _gen_mask(padding)
    _assert_outputs_close(
        sdpa(genes, values, padding, batch), varlen(genes, values, padding, batch), padding
    )
    _assert_outputs_close(
        sdpa(genes, values, padding, batch, gen_mask=gen),
        varlen(genes, values, padding, batch, gen_mask=gen),
        padding,
    )


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_generative_mask_without_unknown_genes_is_plain_attention(attention):
    genes, values, padding, batch = _batch()
    model = _model(attention=attention)
    none_unknown = torch.zeros_like(padding)
    _assert_outputs_close(
        model(genes, values, padding, batch),
        model(genes, values, padding, batch, gen_mask=none_unknown),
        padding,
    )


def test_generative_mask_matrix():
    gen = torch.tensor([[False, False, True, True, False]])
    keep = torch.tensor([[True, True, True, True, False]])
    m = generative_mask(gen, keep)[0, 0].int()  # (L, L) query x key
    assert m.tolist() == [
        [1, 1, 0, 0, 0],  # prompt tokens see prompt tokens only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # an unknown gene sees the prompt and itself
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 1],  # padding query: discarded; the diagonal keeps its row finite
    ]


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_generative_mask_semantics(attention):
    """Prompt outputs ignore unknown genes; each unknown gene's output is that of prompt + itself alone."""
    genes, values, padding, batch = _batch()
    genes, values, padding = (x[:1, :10] for x in (genes, values, padding))
    model = _model(attention=attention)
    gen = torch.zeros_like(padding)
    gen[0, [3, 5, 6]] = True
    masked = values.masked_fill(gen, float(keys.MASK_VALUE))
    out = model(genes, masked, padding, batch[:1], gen_mask=gen)
    prompt = (~gen[0]).nonzero().squeeze(1)
    # Changing the unknown genes' identities changes nothing at prompt positions nor the cell embedding.
    genes2 = genes.clone()
    genes2[gen] = torch.tensor([40, 41, 42])
    out2 = model(genes2, masked, padding, batch[:1], gen_mask=gen)
    torch.testing.assert_close(out["cell_emb"], out2["cell_emb"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["gep"][0, prompt], out2["gep"][0, prompt], atol=1e-6, rtol=0)
    for i in (3, 5, 6):
        idx = torch.cat([prompt, torch.tensor([i])])
        last = torch.zeros(1, len(idx), dtype=torch.bool)
        last[0, -1] = True  # the other unknown genes are gone: they must not have mattered
        alone = model(genes[:, idx], masked[:, idx], padding[:, idx], batch[:1], gen_mask=last)
        torch.testing.assert_close(out["gep"][0, i], alone["gep"][0, -1], atol=1e-5, rtol=1e-5)


def test_cell_prompt_generation():
    """Cell-prompt generation: the <cls> input is replaced by a given cell embedding; every gene is unknown."""
    genes, values, padding, batch = _batch()
    model = _model()
    gen = ~padding
    gen[:, 0] = False
    with torch.no_grad():  # the <cls> token's own input embedding reproduces the plain run exactly
        cls_input = model.encoder(genes[:, 0]) + model.value_encoder(values[:, 0])  # (B, D)
    a = model(genes, values, padding, batch, gen_mask=gen)
    b = model(genes, values, padding, batch, gen_mask=gen, cell_prompt=cls_input)
    _assert_outputs_close(a, b, padding)
    c = model(genes, values, padding, batch, gen_mask=gen, cell_prompt=torch.randn(3, 16))
    assert (c["gep"][~padding] - a["gep"][~padding]).abs().max() > 1e-3
    # a generated gene sees only the prompt and itself: its output is the two-token run's output
    two = torch.tensor([[False, True]])
    one = model(
        genes[:1, [0, 4]],
        values[:1, [0, 4]],
        padding[:1, [0, 4]],
        batch[:1],
        gen_mask=two,
        cell_prompt=cls_input[:1],
    )
    torch.testing.assert_close(b["gep"][0, 4], one["gep"][0, 1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- embeddings and condition tokens


def test_category_value_codes():
    enc = CategoryValueEncoder(n_bins=51, d_model=8)
    v = torch.tensor([0.0, 7.0, 50.0, keys.PAD_VALUE, keys.MASK_VALUE])
    assert enc.codes(v).tolist() == [0, 7, 50, 51, 52]
    assert enc(v).shape == (5, 8)


@pytest.mark.parametrize("style", ["continuous", "category", "scaling"])
@pytest.mark.parametrize("cell_style", ["cls", "avg-pool", "w-pool"])
def test_styles_ignore_padding(style, cell_style):
    genes, values, padding, batch = _batch()
    model = _model(input_emb_style=style, cell_emb_style=cell_style)
    short = model(genes[1:2, :8], values[1:2, :8], padding[1:2, :8], batch[1:2])
    padded = model(genes[1:2], values[1:2], padding[1:2], batch[1:2])
    torch.testing.assert_close(short["cell_emb"], padded["cell_emb"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short["gep"], padded["gep"][:, :8], atol=1e-5, rtol=1e-5)
    assert (padded["gep"][:, 8:] == 0).all()


def test_cell_embedding_styles_definition():
    genes, values, padding, batch = _batch()
    cls_model, avg = _same_weights(cell_emb_style="avg-pool")
    _, wpool = _same_weights(cell_emb_style="w-pool")
    h, _ = cls_model.encode(genes, values, padding)  # (B, L, D), zeros at padding
    keep = (~padding).float()
    torch.testing.assert_close(cls_model(genes, values, padding, batch)["cell_emb"], h[:, 0])
    mean = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    torch.testing.assert_close(avg(genes, values, padding, batch)["cell_emb"], mean)
    weighted = torch.nn.functional.normalize((h * (values * keep)[..., None]).sum(1), dim=1)
    torch.testing.assert_close(wpool(genes, values, padding, batch)["cell_emb"], weighted)
    torch.testing.assert_close(avg.cell_embedding(h, values, padding), mean)


def test_modality_and_perturbation_tokens():
    genes, values, padding, batch = _batch()
    model = _model(use_modality=True, use_perturbation=True)
    pert = torch.zeros_like(genes)
    pert[padding] = PERT_PAD_ID
    base = model(genes, values, padding, batch, modality=torch.tensor([0, 0, 0]), perturbation=pert)
    other_mod = model(
        genes, values, padding, batch, modality=torch.tensor([1, 0, 0]), perturbation=pert
    )
    assert (base["cell_emb"][0] - other_mod["cell_emb"][0]).abs().max() > 1e-3
    torch.testing.assert_close(
        base["cell_emb"][1:], other_mod["cell_emb"][1:]
    )  # per-cell condition
    pert2 = pert.clone()
    pert2[0, 2] = 1  # perturb one gene of cell 0
    flagged = model(
        genes, values, padding, batch, modality=torch.tensor([0, 0, 0]), perturbation=pert2
    )
    assert (flagged["gep"][0] - base["gep"][0]).abs().max() > 1e-4
    torch.testing.assert_close(flagged["gep"][1:], base["gep"][1:])
    assert model.pert_encoder.weight[PERT_PAD_ID].abs().sum() == 0
    with pytest.raises(ValueError, match="pass `modality`"):
        model(genes, values, padding, batch, perturbation=pert)


def test_dsbn_routes_each_cell_to_its_domain():
    genes, values, padding, _ = _batch()
    model = _model(domain_spec_batchnorm="dsbn", use_batch_labels=False)
    with torch.no_grad():
        for i, bn in enumerate(model.dsbn.bns):
            bn.running_mean.fill_(0.5 * i)
            bn.running_var.fill_(1.0 + i)
    batch = torch.tensor([0, 1, 0])
    mixed = model(genes, values, padding, batch)["cell_emb"]
    alone = torch.cat(
        [
            model(genes[i : i + 1], values[i : i + 1], padding[i : i + 1], batch[i : i + 1])[
                "cell_emb"
            ]
            for i in range(3)
        ]
    )
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    assert (
        mixed[1] - model(genes[1:2], values[1:2], padding[1:2], torch.tensor([0]))["cell_emb"][0]
    ).abs().max() > 1e-3


def test_train_mode_batchnorm_statistics_exclude_padding():
    genes, values, padding, batch = _batch()
    model = _model(
        domain_spec_batchnorm="batchnorm"
    ).train()  # dropout is 0: only BN depends on mode
    extra = 4  # four more padding columns
    pad = lambda x, v: torch.nn.functional.pad(x, (0, extra), value=v)  # noqa: E731
    a = model(genes, values, padding, batch)
    b = model(pad(genes, PAD), pad(values, keys.PAD_VALUE), pad(padding, True), batch)
    torch.testing.assert_close(a["cell_emb"], b["cell_emb"], atol=1e-5, rtol=1e-5)


def test_dar_head_reverses_gradients():
    genes, values, padding, batch = _batch()
    model = _model(do_dab=True, n_cls=4)
    out = model(genes, values, padding, batch)
    assert out["dar_logits"].shape == (3, 2) and out["cls_logits"].shape == (3, 4)
    emb = out["cell_emb"].detach().requires_grad_(True)
    head = model.grad_reverse_discriminator
    (g_rev,) = torch.autograd.grad(head(emb).sum(), emb)
    (g_plain,) = torch.autograd.grad(ClsDecoder.forward(head, emb).sum(), emb)
    torch.testing.assert_close(g_rev, -g_plain)


def test_explicit_zero_prob_outputs_are_probabilities():
    genes, values, padding, batch = _batch()
    out = _model(explicit_zero_prob=True)(genes, values, padding, batch)
    for k in ("gep_zero_prob", "gepc_zero_prob"):
        p = out[k][~padding]
        assert ((p > 0) & (p < 1)).all()


def test_cce_second_view_differs_only_by_dropout():
    genes, values, padding, batch = _batch()
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=2, d_hid=32, dropout=0.3, n_batches=2)
    model = build_model(cfg, N_TOKENS, PAD).train()
    out = model(genes, values, padding, batch, cce=True)
    assert (out["cell_emb"] - out["cell_emb2"]).abs().max() > 1e-4
    model.eval()
    out = model(genes, values, padding, batch, cce=True)
    torch.testing.assert_close(out["cell_emb"], out["cell_emb2"])


def test_gradient_checkpointing_same_gradients():
    genes, values, padding, batch = _batch()
    grads = []
    for ckpt in (False, True):
        model = _model().train()
        model.transformer_encoder.gradient_checkpointing = ckpt
        model(genes, values, padding, batch)["gep"].sum().backward()
        grads.append(model.encoder.embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_mask_ratio_schedule():
    gen = torch.Generator().manual_seed(0)
    assert draw_mask_ratio(0.4, [], gen) == 0.4
    drawn = {draw_mask_ratio(0.4, [0.25, 0.5, 0.75], gen) for _ in range(50)}
    assert drawn == {0.25, 0.5, 0.75}


def test_model_config_rejects_unknown_styles():
    with pytest.raises(ValueError, match="input_emb_style"):
        ModelConfig(input_emb_style="binned")
    with pytest.raises(ValueError, match="cell_emb_style"):
        ModelConfig(cell_emb_style="max-pool")


def test_cpu_attention_dropout_is_inverted_dropout_on_the_weights():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    torch.manual_seed(7)
    out = sdpa(q, k, v, mask, 0.25)
    torch.manual_seed(7)
    keep, scale = dropout_keep_mask((2, 3, 5, 5), 0.25)
    scores = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    torch.testing.assert_close(out, (weights * keep * scale) @ v)
    no_drop = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(sdpa(q, k, v, mask, 0.0), no_drop)


@pytest.mark.parametrize("init", ["small", "reference", "torch"])
def test_init_styles(init):
    model = _model(init=init, input_emb_style="category")
    gene = model.encoder.embedding.weight
    value = model.value_encoder.embedding.weight
    if init == "torch":
        assert gene.abs().max() > 1.0  # N(0, 1)
        return
    assert gene.abs().max() <= 0.1 and gene[PAD].abs().sum() == 0
    if init == "small":  # every table, pad rows zero
        assert value.abs().max() <= 0.1 and model.batch_encoder.embedding.weight.abs().max() <= 0.1
        assert value[model.value_encoder.n_bins].abs().sum() == 0
    else:  # the reference touches the gene embedding only
        assert value.abs().max() > 1.0


def test_pre_norm_blocks():
    genes, values, padding, batch = _batch()
    post, pre = _model(), _model(norm_first=True)
    assert post.transformer_encoder.final_norm is None
    assert pre.transformer_encoder.final_norm is not None
    out = pre(genes, values, padding, batch)
    assert out["cell_emb"].shape == (3, 16) and torch.isfinite(out["gep"]).all()
    # Same weights, other block order: other outputs; padding still changes nothing.
    shared = {k: v for k, v in post.state_dict().items()}
    pre.load_state_dict({**pre.state_dict(), **shared})
    assert not torch.allclose(
        post(genes, values, padding, batch)["gep"], pre(genes, values, padding, batch)["gep"]
    )
    short = pre(genes[1:2, :8], values[1:2, :8], padding[1:2, :8], batch[1:2])
    torch.testing.assert_close(
        short["gep"],
        pre(genes[1:2], values[1:2], padding[1:2], batch[1:2])["gep"][:, :8],
        atol=1e-5,
        rtol=1e-5,
    )


def test_model_config_rejects_unknown_init():
    with pytest.raises(ValueError, match="model.init"):
        ModelConfig(init="xavier")

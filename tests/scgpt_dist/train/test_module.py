"""Optimizer parameter groups and learning-rate schedules."""

import math

import pytest
import torch

from scgpt_dist.config import ModelConfig, TrainConfig
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train.module import lr_lambda, param_groups


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


def test_split_views_see_disjoint_genes():
    """objectives.cce_view: split — each view's embedding depends only on its own half of the genes (the
    GEP-masked ones or the others), so CCE cannot match two views by the identity of the input."""
    from data_ingest import keys
    from scgpt_dist.config import ObjectiveConfig
    from scgpt_dist.model.collate import Batch, mask_values
    from scgpt_dist.train.module import compute_loss, split_views

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(d_model=16, n_heads=2, n_layers=2, d_hid=32, n_batches=2, dropout=0.0), 40, 0
    ).eval()
    b, length = 4, 12
    genes = torch.randint(3, 40, (b, length))
    genes[:, 0] = 1  # <cls>
    values = torch.randint(1, 20, (b, length)).float()
    values[:, 0] = 0.0
    genes[3, 9:] = 0  # one cell with padding
    values[3, 9:] = keys.PAD_VALUE
    batch = Batch(genes, values, genes == 0, torch.tensor([0, 1, 0, 1]), torch.full((b,), -1),
                  torch.arange(b))  # fmt: skip
    _, mask = mask_values(values, 0.4, torch.Generator().manual_seed(1))
    a1, b1 = (o["cell_emb"] for o in split_views(model, batch, mask, {}, "cpu"))
    # Change only the masked genes' values and identities: view 1 (unmasked genes) must not move.
    other = Batch(genes.where(~mask, genes.roll(1, 1).clamp(min=3)), values + 5 * mask, genes == 0,
                  batch.batch, batch.label, batch.cell_id)  # fmt: skip
    a2, b2 = (o["cell_emb"] for o in split_views(model, other, mask, {}, "cpu"))
    torch.testing.assert_close(a1, a2)
    assert (b1 - b2).abs().max() > 1e-3
    # The loss uses these views (not the dropout views) and trains.
    obj = ObjectiveConfig(gep=1.0, gepc=0.0, cce=1.0, cce_view="split")
    loss, parts = compute_loss(model.train(), batch, values.masked_fill(mask, -1.0), mask, obj)
    assert "cce" in parts and torch.isfinite(loss)
    loss.backward()
    assert model.transformer_encoder.layers[0].self_attn.Wqkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cce_view"):
        ObjectiveConfig(cce_view="halves")


def test_gepc_hidden_queries_genes_the_embedding_never_saw():
    """GEPC-hidden: the hidden (masked) genes with their values plus genes outside the input with value
    0 are the queries; the pass that makes the embedding sees none of them."""
    from scgpt_dist.config import ObjectiveConfig
    from scgpt_dist.model.collate import Batch
    from scgpt_dist.train.module import compute_loss, hidden_queries

    genes = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    values = torch.tensor([[0.0, 3, 4, 5, 6], [0.0, 7, 8, -2, -2]])
    hidden = torch.tensor([[False, True, False, True, False], [False, False, True, False, False]])
    q, target, ok = hidden_queries(genes, values, hidden, 12, 2.0, torch.Generator().manual_seed(0))
    assert q.shape == target.shape == ok.shape == (2, 5 + 4)
    assert q[0, :5].tolist() == [0, 5, 0, 7, 0] and target[0, :5].tolist() == [0, 3, 0, 5, 0]
    assert q[1, :5].tolist() == [0, 0, 10, 0, 0] and target[1, :5].tolist() == [0, 0, 8, 0, 0]
    for b in range(
        2
    ):  # negatives: genes (id >= 3) not in the cell, value 0, about 2x the hidden count
        neg = q[b, 5:][ok[b, 5:]]
        assert (neg >= 3).all() and not set(neg.tolist()) & set(genes[b].tolist())
        assert (target[b, 5:] == 0).all() and int(ok[b, 5:].sum()) <= 2 * int(hidden[b].sum())
    assert int(ok[0, 5:].sum()) > 0

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(d_model=16, n_heads=2, n_layers=1, d_hid=32, n_batches=2, dropout=0.0), 12, 0
    )
    batch = Batch(genes, values, genes == 0, torch.tensor([0, 1]), torch.full((2,), -1),
                  torch.arange(2))  # fmt: skip
    obj = ObjectiveConfig(gep=0.0, gepc=0.0, gepc_hidden=1.0, gepc_hidden_negatives=2.0)
    loss, parts = compute_loss(model, batch, values.masked_fill(hidden, -1.0), hidden, obj,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert set(parts) == {"gepc_hidden"} and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.embedding.weight.grad[7].abs().sum() > 0  # a hidden gene's query embedding
    presence = ObjectiveConfig(gep=0.0, gepc=0.0, gepc_hidden=1.0, gepc_hidden_target="presence")
    with pytest.raises(ValueError, match="explicit_zero_prob"):
        compute_loss(model, batch, values.masked_fill(hidden, -1.0), hidden, presence)
    model = build_model(
        ModelConfig(d_model=16, n_heads=2, n_layers=1, d_hid=32, n_batches=2, dropout=0.0,
                    explicit_zero_prob=True), 12, 0,
    )  # fmt: skip
    loss_p, _ = compute_loss(model, batch, values.masked_fill(hidden, -1.0), hidden, presence,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert 0.0 < float(loss_p) < 5.0  # a Bernoulli NLL, not a squared bin error
    with pytest.raises(ValueError, match="gepc_hidden_target"):
        ObjectiveConfig(gepc_hidden_target="counts")
    with pytest.raises(ValueError, match="model.do_mvc"):
        from scgpt_dist.config import ExperimentConfig

        ExperimentConfig(model=ModelConfig(do_mvc=False), objectives=obj)


def test_thinned_views_are_contrasted_with_each_other():
    """objectives.cce_view: thinned — CCE pulls the `<cls>` of a cell's two thinned records together: the
    loss changes when only a view changes, and a batch without views is a clear error."""
    from data_ingest import keys
    from scgpt_dist.config import ObjectiveConfig
    from scgpt_dist.model.collate import Batch, mask_values
    from scgpt_dist.train.module import compute_loss

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(d_model=16, n_heads=2, n_layers=2, d_hid=32, n_batches=2, dropout=0.0), 40, 0
    )
    b, length = 4, 12
    genes = torch.randint(3, 40, (b, length))
    genes[:, 0] = 1  # <cls>
    values = torch.randint(1, 20, (b, length)).float()
    values[:, 0] = keys.PAD_VALUE
    cells, labels = torch.tensor([0, 1, 0, 1]), torch.full((b,), -1)

    def batch_with(first, second):
        views = tuple(
            Batch(g, v, g == 0, cells, labels, torch.arange(b))
            for g, v in ((genes[:, :8], first), (genes[:, 4:], second))
        )
        return Batch(genes, values, genes == 0, cells, labels, torch.arange(b), views=views)

    _, mask = mask_values(values, 0.4, torch.Generator().manual_seed(1))
    masked = values.masked_fill(mask, -1.0)
    obj = ObjectiveConfig(gep=0.0, gepc=0.0, cce=1.0, cce_view="thinned", cce_temp=0.1)
    first, second = (values[:, :8] // 2).clamp(min=1), (values[:, 4:] // 3).clamp(min=1)
    first[:, 0] = keys.PAD_VALUE
    loss, parts = compute_loss(model, batch_with(first, second), masked, mask, obj)
    other, _ = compute_loss(model, batch_with(first, second.flip(0)), masked, mask, obj)
    assert set(parts) == {"cce"} and torch.isfinite(loss) and abs(float(loss - other)) > 1e-4
    loss.backward()
    assert model.transformer_encoder.layers[0].self_attn.Wqkv.weight.grad.abs().sum() > 0
    no_view = Batch(genes, values, genes == 0, cells, labels, torch.arange(b))
    with pytest.raises(ValueError, match="data.tokenizer.thinned_view"):
        compute_loss(model, no_view, masked, mask, obj)


def test_cce_batch_offset_adds_a_learned_vector_per_batch_to_each_view():
    """model.cce_batch_offset: the contrast compares each view's `<cls>` plus its batch's vector (zero at
    init, so the first loss is the plain one), the vectors learn, `cell_emb` itself is untouched, and
    without CCE the option is a config error."""
    from data_ingest import keys
    from scgpt_dist.config import ExperimentConfig, ObjectiveConfig
    from scgpt_dist.model.collate import Batch
    from scgpt_dist.model.losses import cce_loss
    from scgpt_dist.train.module import compute_loss

    cfg = dict(d_model=16, n_heads=2, n_layers=1, d_hid=32, n_batches=2, dropout=0.0)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**cfg), 40, 0)
    model = build_model(ModelConfig(**cfg, cce_batch_offset=True), 40, 0)
    missing, extra = model.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["cce_batch_offset.weight"] and not extra
    b, length = 6, 10
    genes = torch.randint(3, 40, (b, length))
    genes[:, 0] = 1
    values = torch.randint(1, 20, (b, length)).float()
    values[:, 0] = keys.PAD_VALUE
    cells, labels = torch.tensor([0, 1, 0, 1, 1, 0]), torch.full((b,), -1)
    views = tuple(
        Batch(g, v, g == 0, cells, labels, torch.arange(b))
        for g, v in ((genes[:, :7], values[:, :7]), (genes[:, 3:], values[:, 3:].clone()))
    )
    views[1].values[:, 0] = keys.PAD_VALUE
    batch = Batch(genes, values, genes == 0, cells, labels, torch.arange(b), views=views)
    mask = torch.zeros(b, length, dtype=torch.bool)
    obj = ObjectiveConfig(gep=0.0, gepc=0.0, cce=1.0, cce_view="thinned", cce_temp=0.1)
    base, _ = compute_loss(plain, batch, values, mask, obj)
    first, _ = compute_loss(model, batch, values, mask, obj)
    assert torch.allclose(base, first)
    with torch.no_grad():
        model.cce_batch_offset.weight.normal_()
    loss, _ = compute_loss(model, batch, values, mask, obj)
    with torch.no_grad():
        one, two = (model(v.genes, v.values, v.padding, cells)["cell_emb"] for v in views)
        shift = model.cce_batch_offset.weight[cells]
        expected = 0.5 * (
            cce_loss(one + shift, two + shift, 0.1) + cce_loss(two + shift, one + shift, 0.1)
        )
    assert torch.allclose(loss, expected, atol=1e-5) and not torch.allclose(loss, base)
    loss.backward()
    assert (
        model.cce_batch_offset.weight.grad.abs().sum(1) > 0
    ).all()  # both batches' vectors learn
    with pytest.raises(ValueError, match="model.cce_batch_offset"):
        ExperimentConfig(
            model=ModelConfig(cce_batch_offset=True), objectives=ObjectiveConfig(cce=0.0)
        )

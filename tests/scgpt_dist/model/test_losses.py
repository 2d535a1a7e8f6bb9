"""Each objective against hand-computed values and, where it exists, the reference scGPT's formula."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_ingest import keys
from scgpt_dist.config import ExperimentConfig, ModelConfig, ObjectiveConfig
from scgpt_dist.model.collate import Batch, mask_values
from scgpt_dist.model.losses import (
    REGISTRY,
    cce_loss,
    cls_loss,
    dar_loss,
    ecs_loss,
    gep_zero_loss,
    gepc_zero_loss,
    masked_bernoulli_nll,
    masked_mse,
    model_problems,
    total_loss,
)
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train.module import cell_prompt_inputs, compute_loss


def _reference_loss_module():
    spec = importlib.util.find_spec("scgpt")
    if spec is None:
        pytest.skip("reference scGPT not installed (make install adds it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("_scgpt_reference_loss", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)  # imports only torch
    return mod


def test_bernoulli_nll_by_hand():
    prob = torch.tensor([[0.8, 0.3, 0.9]])
    target = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    expected = -(math.log(0.8) + math.log(0.7)) / 2
    assert masked_bernoulli_nll(prob, target, mask).item() == pytest.approx(expected, rel=1e-6)
    out = {"gep_zero_prob": prob, "gepc_zero_prob": 1 - prob}
    assert gep_zero_loss(out, target, mask).item() == pytest.approx(expected, rel=1e-6)
    expected_c = -(math.log(0.2) + math.log(0.3)) / 2
    assert gepc_zero_loss(out, target, mask).item() == pytest.approx(expected_c, rel=1e-6)


def test_mse_and_bernoulli_match_reference_formulas():
    ref = _reference_loss_module()
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 9, generator=g)
    prob = torch.rand(4, 9, generator=g) * 0.98 + 0.01
    target = torch.randint(0, 5, (4, 9), generator=g).float()
    mask = torch.rand(4, 9, generator=g) < 0.5
    torch.testing.assert_close(
        masked_mse(pred, target, mask), ref.masked_mse_loss(pred, target, mask)
    )
    torch.testing.assert_close(
        masked_bernoulli_nll(prob, target, mask),
        ref.criterion_neg_log_bernoulli(prob, target, mask),
        rtol=1e-5,
        atol=1e-6,
    )


def test_ecs_by_hand():
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert ecs_loss(orthogonal, 0.3).item() == pytest.approx(1 - 0.09)
    same = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    # off-diagonal cos 1 -> 1 - 0.49; the zeroed diagonal -> 1 - 0.09; mean of the 2 x 2 matrix
    assert ecs_loss(same, 0.3).item() == pytest.approx((0.51 * 2 + 0.91 * 2) / 4, rel=1e-6)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # negative similarities are not optimized
    assert ecs_loss(opposite, 0.3).item() == pytest.approx(0.91, rel=1e-6)


def test_cce_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # each view's positive has cos 1, the negative cos 0; temp 0.5 -> logits [2, 0]
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert cce_loss(a, a, 0.5).item() == pytest.approx(expected, rel=1e-6)
    swapped = a.flip(0)  # positives orthogonal, negatives identical: a worse loss
    assert cce_loss(a, swapped, 0.5).item() > expected + 1


def test_ecs_and_cce_match_reference_model():
    from data_ingest.vocab import GeneVocab
    from scgpt_dist.model import reference

    try:
        reference.load_reference_module()
    except ImportError:
        pytest.skip("reference scGPT not installed")
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(20)])
    args = {"embsize": 16, "nheads": 2, "d_hid": 16, "nlayers": 1, "dropout": 0.0, "n_bins": 51}
    torch.manual_seed(0)
    ref = reference.build_reference_model(args, vocab).eval()
    genes = torch.randint(3, 23, (5, 7))
    values = torch.randint(0, 51, (5, 7)).float()
    padding = torch.zeros(5, 7, dtype=torch.bool)
    with torch.no_grad():
        out = ref(genes, values, padding, ECS=True, CCE=True)
    emb = out["cell_emb"]
    torch.testing.assert_close(ecs_loss(emb, ref.ecs_threshold), out["loss_ecs"])
    torch.testing.assert_close(cce_loss(emb, emb, ref.sim.temp), out["loss_cce"])


def test_dar_and_cls_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = (
        -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.exp(1) / (1 + math.exp(1)))) / 2
    )
    assert dar_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-6)
    # unlabelled cells (-1) are ignored; none labelled -> 0 with a gradient path
    only_first = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert cls_loss(logits, torch.tensor([0, -1])).item() == pytest.approx(only_first, rel=1e-6)
    z = cls_loss(logits.requires_grad_(True), torch.tensor([-1, -1]))
    assert z.item() == 0.0 and z.requires_grad


def _outputs():
    g = torch.Generator().manual_seed(0)
    b, length = 4, 6
    return (
        {
            "gep": torch.randn(b, length, generator=g),
            "gepc": torch.randn(b, length, generator=g),
            "gep_zero_prob": torch.rand(b, length, generator=g),
            "gepc_zero_prob": torch.rand(b, length, generator=g),
            "cell_emb": torch.randn(b, 8, generator=g),
            "cell_emb2": torch.randn(b, 8, generator=g),
            "dar_logits": torch.randn(b, 3, generator=g),
            "cls_logits": torch.randn(b, 5, generator=g),
        },
        torch.randint(0, 5, (b, length), generator=g).float(),
        torch.rand(b, length, generator=g) < 0.5,
    )


def test_total_loss_weights_every_objective():
    out, target, mask = _outputs()
    batch, labels = torch.tensor([0, 1, 2, 0]), torch.tensor([1, -1, 4, 0])
    w = dict(gep=1.0, gepc=0.5, gep_zero=0.25, gepc_zero=0.125, ecs=2.0, cce=3.0, dar=0.7, cls=0.3)
    cfg = ObjectiveConfig(**w, ecs_threshold=0.4, cce_temp=0.2)
    total, parts = total_loss(out, target, mask, cfg, batch=batch, labels=labels)
    assert set(parts) == set(w)
    expected = {
        "gep": masked_mse(out["gep"], target, mask),
        "gepc": masked_mse(out["gepc"], target, mask),
        "gep_zero": masked_bernoulli_nll(out["gep_zero_prob"], target, mask),
        "gepc_zero": masked_bernoulli_nll(out["gepc_zero_prob"], target, mask),
        "ecs": ecs_loss(out["cell_emb"], 0.4),
        "cce": cce_loss(out["cell_emb"], out["cell_emb2"], 0.2),
        "dar": dar_loss(out["dar_logits"], batch),
        "cls": cls_loss(out["cls_logits"], labels),
    }
    for k, v in expected.items():
        torch.testing.assert_close(parts[k], v)
    torch.testing.assert_close(total, sum(w[k] * expected[k] for k in w))


def test_defaults_are_gep_and_gepc_only():
    out, target, mask = _outputs()
    _, parts = total_loss(out, target, mask, ObjectiveConfig())
    assert set(parts) == {"gep", "gepc"}


def test_every_objective_has_a_weight_and_the_total_is_the_registry_sum():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(ObjectiveConfig)}
    for objective in REGISTRY:
        assert objective.name in fields and isinstance(fields[objective.name].default, float)
    # Each enabled entry's loss, weighted, in registry order; nothing else.
    out, target, mask = _outputs()
    cfg = ObjectiveConfig(gep=0.5, gepc=2.0, ecs=3.0)
    total, parts = total_loss(out, target, mask, cfg)
    assert list(parts) == ["gep", "gepc", "ecs"]
    torch.testing.assert_close(total, 0.5 * parts["gep"] + 2.0 * parts["gepc"] + 3.0 * parts["ecs"])
    # What a model lacks is said per objective, with the setting that fixes it.
    lacking = ModelConfig(do_mvc=False)
    assert model_problems(lacking, ObjectiveConfig(gep=1.0, gepc=0.0)) == []
    assert model_problems(lacking, ObjectiveConfig(gepc=1.0, gepc_zero=1.0)) == [
        "objectives.gepc > 0 needs model.do_mvc set; set it or objectives.gepc=0",
        "objectives.gepc_zero > 0 needs model.explicit_zero_prob set; set it or objectives.gepc_zero=0",
    ]


def test_objectives_need_their_heads():
    with pytest.raises(ValueError, match="objectives.cls > 0 needs model.n_cls"):
        ExperimentConfig(objectives=ObjectiveConfig(cls=1.0))
    with pytest.raises(ValueError, match="objectives.dar > 0 needs model.do_dab"):
        ExperimentConfig(objectives=ObjectiveConfig(dar=1.0))
    with pytest.raises(ValueError, match="gep_zero"):
        ExperimentConfig(objectives=ObjectiveConfig(gep_zero=1.0))
    ExperimentConfig(
        model=ModelConfig(explicit_zero_prob=True), objectives=ObjectiveConfig(gep_zero=1.0)
    )
    out, target, mask = _outputs()
    with pytest.raises(ValueError, match="cce=True"):
        del out["cell_emb2"]
        total_loss(out, target, mask, ObjectiveConfig(cce=1.0))


# ------------------------------------------------------------------------- cell-prompt generation


def _cell_prompt_setup():
    g = torch.Generator().manual_seed(0)
    genes = torch.randint(3, 40, (3, 10), generator=g)
    genes[:, 0] = 1  # <cls>
    values = torch.randint(1, 51, (3, 10), generator=g).float()
    values[:, 0] = keys.PAD_VALUE
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[2, 6:] = True
    genes[padding], values[padding] = 0, keys.PAD_VALUE
    n = torch.zeros(3, dtype=torch.long)
    batch = Batch(genes, values, padding, n, n - 1, n)
    masked, mask = mask_values(values, 0.4, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=2, d_hid=32, dropout=0.0, n_batches=1)
    return build_model(cfg, 40, 0), batch, masked, mask


def test_cell_prompt_generation_adds_a_loss_that_trains_the_cell_embedding():
    model, batch, masked, mask = _cell_prompt_setup()
    gene_prompt = ObjectiveConfig(generative=True)
    both = ObjectiveConfig(generative=True, gen_cell_prompt=0.5)
    loss0, parts0 = compute_loss(model, batch, masked, mask, gene_prompt)
    loss1, parts1 = compute_loss(model, batch, masked, mask, both)
    assert set(parts1) == {"gep", "gepc", "gen_cell_prompt"} and "gen_cell_prompt" not in parts0
    assert parts1["gen_cell_prompt"] > 0
    torch.testing.assert_close(loss1, loss0 + 0.5 * parts1["gen_cell_prompt"])
    # the cell-prompt pass generates every real gene but <cls> and sees none of their values
    values_in, gen = cell_prompt_inputs(batch.values, batch.padding)
    assert gen.sum().item() == 9 + 9 + 5 and not gen[:, 0].any()
    assert (values_in[gen] == keys.MASK_VALUE).all()
    # its loss reaches the gene-prompt pass through the cell embedding fed as the prompt: the <cls>
    # token's embedding is used only by pass 1 (pass 2 replaces that input by the prompt)
    only_prompt = ObjectiveConfig(generative=True, gen_cell_prompt=1.0, gep=0.0, gepc=0.0)
    loss, _ = compute_loss(model, batch, masked, mask, only_prompt)
    loss.backward()
    assert model.encoder.embedding.weight.grad[1].abs().sum() > 0


def test_cell_prompt_needs_the_generative_mask():
    with pytest.raises(ValueError, match="gen_cell_prompt > 0 needs objectives.generative"):
        ObjectiveConfig(gen_cell_prompt=1.0)
    out, target, mask = _outputs()
    with pytest.raises(ValueError, match="cell-prompt pass"):
        total_loss(out, target, mask, ObjectiveConfig(generative=True, gen_cell_prompt=1.0))


def _gathered_cce_rank(rank: int, world: int, init: str, cases: list[list[int]], queue) -> None:
    """One gloo rank: for each case (rows per rank), its rows of a shared global batch and the thinned-view
    CCE over every rank's views."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for case, sizes in enumerate(cases):
            one_all = torch.randn(sum(sizes), 8, generator=torch.Generator().manual_seed(1))
            two_all = torch.randn(sum(sizes), 8, generator=torch.Generator().manual_seed(2))
            one_all.requires_grad_(True)
            two_all.requires_grad_(True)
            lo = sum(sizes[:rank])
            local = slice(lo, lo + sizes[rank])
            out = {"cce_view1": one_all[local], "cce_view2": two_all[local]}
            cfg = ObjectiveConfig(gep=0.0, gepc=0.0, cce=1.0, cce_view="thinned", cce_temp=0.2)
            empty = torch.zeros(1, 1)
            loss, _ = total_loss(out, empty, empty.bool(), cfg, gather=True)
            loss.backward()
            grads = (one_all.grad[local].clone(), two_all.grad[local].clone())
            queue.put((case, rank, float(loss.detach()), *grads))
    finally:
        dist.destroy_process_group()


def test_gathered_cce_is_the_global_batch_contrast(tmp_path):
    """With a real 2-rank gloo group, each rank's anchors meet every rank's views as negatives: the loss is
    the single-process contrast of the global batch restricted to the rank's anchors, and the gradients
    reaching each rank's rows (summed over ranks' losses) are the single-process gradients; equal and
    unequal micro-batches."""
    import torch.multiprocessing as mp

    cases = [[3, 3], [4, 2]]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'pg'}"
    procs = [
        ctx.Process(target=_gathered_cce_rank, args=(r, 2, init, cases, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    got = {(c, r): rest for c, r, *rest in (queue.get(timeout=120) for _ in range(4))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for case, sizes in enumerate(cases):
        one = torch.randn(sum(sizes), 8, generator=torch.Generator().manual_seed(1))
        two = torch.randn(sum(sizes), 8, generator=torch.Generator().manual_seed(2))
        one.requires_grad_(True)
        two.requires_grad_(True)
        losses = []
        for r, n in enumerate(sizes):
            lo = sum(sizes[:r])
            a, b = one[lo : lo + n], two[lo : lo + n]
            rank_loss = 0.5 * (cce_loss(a, two, 0.2, lo) + cce_loss(b, one, 0.2, lo))
            # by hand: the full similarity matrix's rows for this rank's anchors
            sim = F.normalize(a, dim=1) @ F.normalize(two, dim=1).T
            expected = F.cross_entropy(sim / 0.2, torch.arange(n) + lo)
            assert float(cce_loss(a, two, 0.2, lo).detach()) == pytest.approx(
                float(expected), rel=1e-5
            )
            assert got[case, r][0] == pytest.approx(float(rank_loss.detach()), rel=1e-5)
            losses.append(rank_loss)
        # data parallelism averages the ranks' gradients: d(mean of rank losses) / d rows, x world size
        torch.stack(losses).sum().backward()
        for r, n in enumerate(sizes):
            lo = sum(sizes[:r])
            assert torch.allclose(got[case, r][1], one.grad[lo : lo + n], atol=1e-6)
            assert torch.allclose(got[case, r][2], two.grad[lo : lo + n], atol=1e-6)


def test_gather_without_a_process_group_is_the_local_batch():
    cfg = ObjectiveConfig(gep=0.0, gepc=0.0, cce=1.0, cce_view="thinned", cce_temp=0.2)
    one, two = torch.randn(5, 8), torch.randn(5, 8)
    empty = torch.zeros(1, 1)
    out = {"cce_view1": one, "cce_view2": two}
    gathered, _ = total_loss(out, empty, empty.bool(), cfg, gather=True)
    local, _ = total_loss(out, empty, empty.bool(), cfg, gather=False)
    assert float(gathered) == pytest.approx(float(local))

"""Warm start (scgpt_dist.train.warmstart): stable vocabulary growth, row initialisation by name, identical behaviour
on what the promoted model knew, and loading into real DeepSpeed engines (ZeRO-2 and ZeRO-3, 2 ranks, gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from data_ingest import keys
from data_ingest.vocab import GeneVocab
from scgpt_dist.config import ExperimentConfig, ModelConfig, TrainConfig
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train.checkpoint import LoadedModel
from scgpt_dist.train.warmstart import (
    BATCH_EMBEDDING,
    GENE_EMBEDDING,
    check_stable_extension,
    extended_vocab,
    load_into_engine,
    warm_start_state,
    write_model_dir,
)

OLD_GENES = [f"G{i}" for i in range(12)]
NEW_GENES = ["N0", "N1", "N2"]


def _cfg(n_batches: int) -> ModelConfig:
    return ModelConfig(
        d_model=16,
        n_heads=2,
        n_layers=1,
        d_hid=32,
        dropout=0.0,
        n_batches=n_batches,
        domain_spec_batchnorm="dsbn",
        do_dab=True,
    )


@pytest.fixture
def promoted() -> LoadedModel:
    vocab = GeneVocab.from_genes(OLD_GENES)
    torch.manual_seed(3)
    model = build_model(_cfg(2), len(vocab), vocab.pad_id)
    with torch.no_grad():  # distinct DSBN statistics per batch, so a wrong mapping shows
        for i, bn in enumerate(model.dsbn.bns):
            bn.running_mean.fill_(0.1 * (i + 1))
            bn.running_var.fill_(1.0 + i)
    model.eval()
    meta = {"data": {"batch_categories": ["ds_a", "ds_c"]}}
    return LoadedModel(model=model, config=ExperimentConfig(), vocab=vocab, meta=meta)


def test_vocab_extension_is_stable():
    old = GeneVocab.from_genes(OLD_GENES)
    new, added = extended_vocab(old, ["G3", "N0", "G5", "N1"])
    assert added == ["N0", "N1"] and len(new) == len(old) + 2 and len(old) == 15  # old untouched
    assert all(new[t] == i for t, i in old.to_dict().items())
    check_stable_extension(old, new)
    reordered = GeneVocab.from_genes(["N0", *OLD_GENES])
    with pytest.raises(ValueError, match="other ids"):
        check_stable_extension(old, reordered)


def test_new_rows_and_batches_mapped_by_name(promoted):
    vocab, _ = extended_vocab(promoted.vocab, NEW_GENES)
    cats = ["ds_a", "ds_b", "ds_c"]  # the new dataset sorts between the old ones: old ids shift
    old = promoted.model.state_dict()
    state, report = warm_start_state(promoted, vocab, _cfg(3), cats, noise=0.0)
    assert report.new_genes == 3 and report.new_batches == ["ds_b"] and report.fresh == []
    n_old = len(promoted.vocab)
    gene_mean = old[GENE_EMBEDDING][len(keys.SPECIAL_TOKENS) :].mean(0)
    assert torch.equal(state[GENE_EMBEDDING][:n_old], old[GENE_EMBEDDING])
    assert torch.allclose(state[GENE_EMBEDDING][n_old:], gene_mean.expand(3, -1))
    b = state[BATCH_EMBEDDING]
    assert torch.equal(b[0], old[BATCH_EMBEDDING][0]) and torch.equal(b[2], old[BATCH_EMBEDDING][1])
    assert torch.allclose(b[1], old[BATCH_EMBEDDING].mean(0))
    assert torch.equal(state["dsbn.bns.2.running_mean"], old["dsbn.bns.1.running_mean"])
    assert torch.allclose(state["dsbn.bns.1.running_var"], torch.full((16,), 1.5))  # mean of 1, 2
    w = "grad_reverse_discriminator.out_layer.weight"
    assert torch.equal(state[w][2], old[w][1]) and state[w].shape[0] == 3
    # With noise, new rows differ from each other but stay near the mean.
    noisy, _ = warm_start_state(promoted, vocab, _cfg(3), cats, noise=0.1, seed=1)
    rows = noisy[GENE_EMBEDDING][n_old:]
    spread = old[GENE_EMBEDDING][len(keys.SPECIAL_TOKENS) :].std(0)
    assert not torch.allclose(rows[0], rows[1])
    assert ((rows - gene_mean).abs() <= 0.5 * spread).all()


def test_grown_model_behaves_like_the_promoted_one_on_what_it_knew(promoted):
    vocab, _ = extended_vocab(promoted.vocab, NEW_GENES)
    state, _ = warm_start_state(promoted, vocab, _cfg(3), ["ds_a", "ds_b", "ds_c"], noise=0.0)
    grown = build_model(_cfg(3), len(vocab), vocab.pad_id)
    grown.load_state_dict(state)
    grown.eval()
    gen = torch.Generator().manual_seed(0)
    genes = torch.randint(3, len(promoted.vocab), (4, 8), generator=gen)  # (B, L) known genes
    genes[:, 0] = vocab.cls_id
    values = torch.randint(0, 51, (4, 8), generator=gen).float()  # (B, L)
    padding = torch.zeros(4, 8, dtype=torch.bool)  # (B, L)
    old_batch = torch.tensor([0, 1, 1, 0])  # ds_a, ds_c in the promoted model's ids
    new_batch = torch.tensor([0, 2, 2, 0])  # the same datasets in the grown model's ids
    with torch.no_grad():
        a = promoted.model(genes, values, padding, old_batch)
        b = grown(genes, values, padding, new_batch)
    for key in ("gep", "gepc", "cell_emb"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert torch.allclose(a["dar_logits"], b["dar_logits"][:, [0, 2]], atol=1e-5)


def test_incompatible_promoted_model_is_refused(promoted):
    promoted.meta = {}
    vocab, _ = extended_vocab(promoted.vocab, NEW_GENES)
    with pytest.raises(ValueError, match="batch categories"):
        warm_start_state(promoted, vocab, _cfg(3), ["a", "b", "c"])


# ------------------------------------------------------------------------- DeepSpeed engines (2 ranks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, n_tokens: int) -> None:
    """Each rank: a differently initialised engine, load_into_engine, one step at lr 0 (the optimizer
    writes its fp32 master weights back into the model), then the weights must equal the file's."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import deepspeed
    from safetensors.torch import load_file

    from scgpt_dist.train.module import deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    want = load_file(os.path.join(model_dir, keys.MODEL_FILE))
    for stage in (2, 3):
        torch.manual_seed(100 + stage)  # not the file's weights
        model = build_model(_cfg(3), n_tokens, 0)
        train = TrainConfig(zero_stage=stage, micro_batch_size=2, lr=0.0, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=deepspeed_config(train, world)
        )
        load_into_engine(engine, model_dir)
        genes = torch.randint(3, n_tokens, (2, 6))  # (B, L)
        values = torch.randint(1, 51, (2, 6)).float()  # (B, L)
        out = engine(genes, values, torch.zeros(2, 6, dtype=torch.bool), torch.tensor([0, 2]))
        engine.backward(out["gep"].pow(2).mean())
        engine.step()
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
            for name, p in params:
                assert torch.equal(p.detach().cpu(), want[name]), (stage, name)
        engine.destroy()


@pytest.mark.slow
def test_load_into_zero2_and_zero3_engines(promoted, tmp_path):
    import torch.multiprocessing as mp

    vocab, _ = extended_vocab(promoted.vocab, NEW_GENES)
    state, _ = warm_start_state(promoted, vocab, _cfg(3), ["ds_a", "ds_b", "ds_c"], noise=0.1)
    model_dir = write_model_dir(tmp_path / "init", state, ExperimentConfig(), vocab, {})
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        [keys.MODEL_FILE, keys.CONFIG_FILE, keys.VOCAB_FILE, keys.META_FILE]
    )
    mp.spawn(_rank_main, args=(2, _free_port(), str(model_dir), len(vocab)), nprocs=2, join=True)

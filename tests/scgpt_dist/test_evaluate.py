"""Held-out evaluation: fixed masks, context-free baselines on planted records, embedding scores."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_ingest import keys
from data_ingest.tokenize import RECORD_SCHEMA
from scgpt_dist.config import ModelConfig
from scgpt_dist.evaluate import (
    EVAL_MASK,
    gap_closed,
    gep_baselines,
    heldout_gep,
    masked_batches,
    mean_pairwise_cosine,
    model_scores,
    with_fixed_masks,
)
from scgpt_dist.model.transformer import build_model


def _planted(n_cells=60, n_genes=12, seed=0):
    """Each cell expresses every gene; a gene's bin = 2 + gene + 10 x type + 3 x batch, exactly."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n_cells)
    batches = rng.integers(0, 2, n_cells)
    rows = []
    for i in range(n_cells):
        genes = np.arange(n_genes) + 3
        values = 2 + np.arange(n_genes) + 10 * types[i] + 3 * batches[i]
        rows.append(
            {
                keys.GENES: [1, *genes.tolist()],
                keys.VALUES: [keys.PAD_VALUE, *values.tolist()],
                keys.BATCH: int(batches[i]),
                keys.MODALITY: 0,
                keys.CELL_ID: i,
                keys.LABEL: int(types[i]),
            }
        )
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def test_fixed_masks_are_stable_and_split_invariant():
    table = _planted()
    a, b = with_fixed_masks(table, 0.25, seed=3), with_fixed_masks(table, 0.25, seed=3)
    assert a[EVAL_MASK].equals(b[EVAL_MASK])
    assert not a[EVAL_MASK].equals(with_fixed_masks(table, 0.25, seed=4)[EVAL_MASK])
    for row in a[EVAL_MASK].to_pylist():
        assert row[0] is False and sum(row) == 3  # never <cls>; int(12 x 0.25) genes
    # Scoring a slice sees exactly the slice's stored masks.
    whole = torch.cat([m[:, :13] for _, _, m in masked_batches(a, 0, batch_size=7)])
    part = torch.cat([m for _, _, m in masked_batches(a.slice(20, 15), 0, batch_size=4)])
    assert torch.equal(whole[20:35], part)
    for b_, masked, m in masked_batches(a, 0, batch_size=16):
        assert (masked[m] == keys.MASK_VALUE).all() and (masked[~m] == b_.values[~m]).all()


def test_baselines_on_planted_values():
    train, held = _planted(seed=0), with_fixed_masks(_planted(seed=1), 0.5, seed=0)
    base = gep_baselines(train, held, pad_id=0)
    # Values are gene + 10 x type + 3 x batch: the per-gene x type mean misses only the batch term
    # (variance 9 / 4); the per-gene and per-gene x batch means miss the type term (100 x 2 / 3).
    assert base["per_gene_type_mean"] == pytest.approx(9 / 4, rel=0.25)
    assert base["per_gene_mean"] > 50 and base["per_gene_batch_mean"] > 50
    unlabelled = held.set_column(
        held.schema.get_field_index(keys.LABEL),
        keys.LABEL,
        pa.array([-1] * held.num_rows, pa.int32()),
    )
    assert "per_gene_type_mean" not in gep_baselines(train, unlabelled, pad_id=0)
    assert gap_closed(base["per_gene_type_mean"], base) == pytest.approx(1.0)
    assert gap_closed(base["per_gene_mean"], base) == pytest.approx(0.0)


def test_model_scores_count_the_masked_positions():
    held = with_fixed_masks(_planted(), 0.25, seed=0)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(d_model=16, n_heads=2, n_layers=1, d_hid=32, n_batches=2), 20, 0
    )
    se, n, emb = model_scores(model, 0, held, batch_size=16)
    assert n == 60 * 3 and emb.shape == (60, 16) and se > 0 and model.training
    se2, n2, emb2 = model_scores(model, 0, held.slice(0, 30), batch_size=8)
    np.testing.assert_allclose(emb2, emb[:30], rtol=1e-4, atol=1e-5)
    # The suite's GEP score: the same positions for the model and every baseline.
    score = heldout_gep(model, 0, held, _planted(seed=2))
    assert score["n_masked"] == n and score["model_mse"] == pytest.approx(se / n)
    assert score["baselines"] == gep_baselines(_planted(seed=2), held, pad_id=0)
    assert model_scores(model, 0, held, embed=False)[2].shape == (0, 16)


def test_mean_pairwise_cosine():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5))
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = Xn @ Xn.T
    brute = C[np.triu_indices(40, 1)].mean()
    assert mean_pairwise_cosine(X) == pytest.approx(brute)
    assert mean_pairwise_cosine(np.ones((10, 3)) + 1e-9 * X[:10, :3]) == pytest.approx(1.0)


def test_type_only_batch_knn_is_the_floor_a_type_keeping_embedding_cannot_go_below():
    """Where every dataset has the same type mix, knowing the type says nothing of the dataset (batch kNN
    at the largest dataset's share); where each type lives in one dataset, it says everything."""
    from scgpt_dist.evaluate import type_only_batch_knn

    rng = np.random.default_rng(0)
    types = rng.integers(0, 4, 2000)
    mixed = rng.integers(0, 4, 2000)  # datasets independent of the type
    assert abs(type_only_batch_knn(types, mixed) - np.bincount(mixed).max() / 2000) < 0.05
    assert type_only_batch_knn(types, types) == 1.0

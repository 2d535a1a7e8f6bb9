"""scib metrics (scib-metrics) and the PCA / Harmony / scVI baselines, on toy data with known structure."""

from __future__ import annotations

import numpy as np
import pytest

from data_ingest.synth.small import SynthConfig, make_synthetic
from scgpt_dist.tasks.integration import method as ig


def toy_embeddings(n: int = 240, seed: int = 0):
    """Four well-separated cell types in three batches: one embedding with the batches mixed, one with each
    batch shifted far away (batch effect larger than the cell-type differences)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n // 4)
    batches = np.tile(np.arange(3), n // 3)
    centres = rng.normal(size=(4, 8)) * 6.0
    shifts = rng.normal(size=(3, 8)) * 20.0
    noise = rng.normal(size=(n, 8))
    mixed = centres[labels] + noise
    separated = centres[labels] + shifts[batches] + noise
    return mixed, separated, labels, batches


@pytest.fixture(scope="module")
def toy():
    return toy_embeddings()


def test_mixed_embedding_beats_batch_separated_one(toy):
    mixed, separated, labels, batches = toy
    good = ig.scib_scores(mixed, labels, batches)
    bad = ig.scib_scores(separated, labels, batches)
    assert list(good) == list(ig.METRICS)
    for s in (good, bad):
        assert all(0.0 <= v <= 1.0 + 1e-6 for v in s.values()), s
        assert s["avg_bio"] == pytest.approx(np.mean([s["nmi"], s["ari"], s["asw_celltype"]]))
        assert s["avg_batch"] == pytest.approx(np.mean([s["asw_batch"], s["graph_conn"]]))
        assert s["overall"] == pytest.approx(0.6 * s["avg_bio"] + 0.4 * s["avg_batch"])
    # Types are perfectly recoverable and batches mixed: clustering is exact, batch scores near 1.
    assert good["nmi"] > 0.99 and good["ari"] > 0.99
    assert good["asw_batch"] > 0.85 and good["graph_conn"] > 0.95
    # Each type split in three far-apart batch islands: batch removal collapses, and so does overall.
    assert bad["asw_batch"] < 0.3
    assert bad["graph_conn"] < 0.6
    assert good["avg_batch"] > bad["avg_batch"] + 0.4
    assert good["overall"] > bad["overall"] + 0.2


def test_kmeans_clustering_and_bad_input(toy):
    mixed, _, labels, batches = toy
    s = ig.scib_scores(mixed, labels, batches, ig.ScibConfig(clustering="kmeans"))
    assert s["nmi"] > 0.99
    with pytest.raises(ValueError, match="at least two batches"):
        ig.scib_scores(mixed, labels, np.zeros(len(labels)))
    with pytest.raises(ValueError, match="one row per cell"):
        ig.scib_scores(mixed[:10], labels, batches)
    bad = mixed.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ig.scib_scores(bad, labels, batches)
    with pytest.raises(ValueError, match="clustering"):
        ig.ScibConfig(clustering="louvain")


def test_harmony_and_scvi_remove_a_planted_batch_effect():
    adata = make_synthetic(
        SynthConfig(
            n_cells=300, n_genes=300, n_cell_types=3, n_batches=2, batch_sd=1.0, markers_per_type=30
        )
    )
    labels = adata.obs["cell_type"].to_numpy()
    batches = adata.obs["batch"].to_numpy()
    cfg = ig.BaselineConfig(n_hvg=200, n_pcs=20, scvi_epochs=3)
    pca = ig.pca_baseline(adata.X, cfg)
    harmony = ig.harmony_baseline(pca, batches, cfg)
    scvi_latent = ig.scvi_baseline(adata.X, batches, cfg)
    assert pca.shape == harmony.shape == (300, 20)
    assert scvi_latent.shape == (300, cfg.scvi_latent) and np.isfinite(scvi_latent).all()
    s_pca = ig.scib_scores(pca, labels, batches)
    s_harmony = ig.scib_scores(harmony, labels, batches)
    # The planted per-gene batch effect separates batches in PCA; Harmony mixes them.
    assert s_harmony["asw_batch"] > s_pca["asw_batch"]
    assert s_harmony["avg_batch"] > s_pca["avg_batch"]
    # The planted markers keep cell types recoverable after correction (3 types: chance NMI is ~0).
    assert s_harmony["nmi"] > 0.6

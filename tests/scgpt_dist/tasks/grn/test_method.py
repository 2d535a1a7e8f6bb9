"""scgpt_dist.grn: edge and program metrics on known answers, the planted truth of a tiny synthetic census, the
correlation baseline on it, attention recomputed from q/k against the model's own attention output, and the
gene-embedding network of a model whose embeddings hold the planted modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_ingest import keys
from data_ingest.synth.census import CensusSynthConfig, experiment_uri, write_synthetic_census
from data_ingest.vocab import GeneVocab
from scgpt_dist.config import ExperimentConfig, dump_config, from_dict
from scgpt_dist.inference import tokenize_anndata
from scgpt_dist.model.collate import collate
from scgpt_dist.model.transformer import build_model
from scgpt_dist.preprocess import log_normalize
from scgpt_dist.tasks.grn import method as grn
from scgpt_dist.tasks.grn import metrics as gm
from scgpt_dist.tasks.runner import load_cells
from scgpt_dist.train.checkpoint import load_consolidated

TINY_CENSUS = CensusSynthConfig(
    n_cells=400,
    n_genes=600,
    n_datasets=2,
    n_tissues=1,
    n_cell_types=3,
    types_per_tissue=3,
    markers_per_type=10,
    n_modules=10,
    genes_per_module=10,
    modules_per_type=3,
    module_fraction=0.15,
    block_cells=512,
)
TINY_MODEL = {
    "model": {
        "d_model": 32,
        "n_heads": 2,
        "n_layers": 2,
        "d_hid": 64,
        "dropout": 0.0,
        "n_batches": 2,
    },
    "data": {"tokenizer": {"max_seq_len": 64}},
}


def write_tiny_census(path: Path) -> Path:
    return write_synthetic_census(path, TINY_CENSUS, progress=False)


def write_tiny_model(
    path: Path, genes: list[str], planted_modules: list[list[str]] | None = None
) -> Path:
    """A random-initialised tiny model in the consolidated layout. With `planted_modules`, each module's genes
    get embeddings near one shared random direction: a model that has learned the modules."""
    from safetensors.torch import save_file

    cfg = from_dict(ExperimentConfig, TINY_MODEL)
    vocab = GeneVocab.from_genes(genes)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab), vocab.pad_id)
    if planted_modules:
        gen = torch.Generator().manual_seed(1)
        weight = model.encoder.embedding.weight.data  # (n_tokens, D)
        for module in planted_modules:
            ids = torch.from_numpy(vocab.lookup(module))
            centre = torch.randn(weight.shape[1], generator=gen) * 2.0  # (D,)
            weight[ids] = centre + 0.3 * torch.randn(len(ids), weight.shape[1], generator=gen)
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / keys.MODEL_FILE))
    (path / keys.CONFIG_FILE).write_text(dump_config(cfg))
    vocab.save(path / keys.VOCAB_FILE)
    return path


@pytest.fixture(scope="module")
def census(tmp_path_factory) -> Path:
    return write_tiny_census(tmp_path_factory.mktemp("grn") / "census")


@pytest.fixture(scope="module")
def cells(census):
    return load_cells(str(census))


@pytest.fixture(scope="module")
def truth(census) -> gm.PlantedNetwork:
    return gm.PlantedNetwork.load(gm.find_truth(census))


@pytest.fixture(scope="module")
def random_model(cells, tmp_path_factory):
    return load_consolidated(
        write_tiny_model(tmp_path_factory.mktemp("model") / "m", list(cells.var_names))
    )


def _block_truth(n_blocks: int = 6, size: int = 10, background: int = 60) -> np.ndarray:
    labels = np.concatenate([np.repeat(np.arange(n_blocks), size), np.full(background, -1)])
    t = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    np.fill_diagonal(t, False)
    return t


# ----------------------------------------------------------------------------------------------- metrics


def test_edge_metrics_on_known_answers():
    t = _block_truth()
    density = t[np.triu_indices(len(t), 1)].mean()

    perfect = gm.evaluate_edges(t.astype(float), t)
    assert perfect.auprc == pytest.approx(1.0)
    assert perfect.early_precision == 1.0 and perfect.auroc == pytest.approx(1.0)
    assert perfect.random_auprc == pytest.approx(density)
    assert perfect.n_edges == 6 * 45 and perfect.n_pairs == 120 * 119 // 2

    # Random scores: AUPRC close to the edge density, on average over seeds.
    ratios = []
    for seed in range(5):
        r = np.random.default_rng(seed).random(t.shape)
        ratios.append(gm.evaluate_edges((r + r.T) / 2, t).auprc_ratio)
    assert 0.75 < np.mean(ratios) < 1.35

    inverted = gm.evaluate_edges(-t.astype(float), t)
    assert inverted.auprc < density * 1.01 and inverted.early_precision == 0.0
    assert gm.evaluate_edges(np.zeros(t.shape), t).auprc == pytest.approx(density)

    # Half of the true edges on top, the rest tied with every non-edge: the 135 top slots left are filled
    # from the tied group at its share of true edges, whatever the gene order.
    half = t.astype(float)
    half[:30, :30] = 0.0
    tied_share = 135 / (perfect.n_pairs - 135)
    expected = (135 + 135 * tied_share) / 270
    assert gm.evaluate_edges(half, t).early_precision == pytest.approx(expected, abs=1e-12)
    order = np.random.default_rng(0).permutation(len(t))
    shuffled = gm.evaluate_edges(half[np.ix_(order, order)], t[np.ix_(order, order)])
    assert shuffled.early_precision == pytest.approx(expected, abs=1e-12)

    with pytest.raises(ValueError, match="planted edges"):
        gm.evaluate_edges(np.ones((5, 5)), np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="same square"):
        gm.evaluate_edges(np.ones((5, 5)), np.zeros((4, 4), bool))


def test_program_recovery_on_known_answers():
    modules = np.concatenate(
        [np.repeat(np.arange(4), 5), np.full(10, -1)]
    )  # 4 modules + background
    same = np.where(modules >= 0, modules + 7, 99)  # relabeled, background in its own program
    p = gm.program_recovery(same, modules)
    assert p.ari == pytest.approx(1.0) and p.best_match_jaccard == pytest.approx(1.0)
    assert p.n_modules == 4

    merged = same.copy()
    merged[modules == 1] = 7  # modules 0 and 1 share one program
    p = gm.program_recovery(merged, modules)
    assert p.ari < 1.0
    assert p.best_match_jaccard == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)

    swallowed = np.where(modules == 0, 0, 1)  # module 0 alone; the rest with the background
    p = gm.program_recovery(swallowed, modules)
    assert p.best_match_jaccard == pytest.approx((1 + 3 * 5 / 25) / 4)

    rng = np.random.default_rng(0)
    big = np.repeat(np.arange(20), 10)
    aris = [gm.program_recovery(rng.integers(0, 20, 200), big).ari for _ in range(5)]
    assert abs(np.mean(aris)) < 0.05

    with pytest.raises(ValueError, match="planted module"):
        gm.program_recovery(np.zeros(5, int), np.full(5, -1))


def test_leiden_programs_recover_blocks_deterministically():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 12)
    sim = (labels[:, None] == labels[None, :]) * 0.8 + rng.normal(0, 0.1, (72, 72))
    sim = (sim + sim.T) / 2
    a = grn.leiden_programs(sim, k=8, resolution=1.0, seed=0)
    b = grn.leiden_programs(sim, k=8, resolution=1.0, seed=0)
    np.testing.assert_array_equal(a, b)
    assert gm.program_recovery(a, labels).ari == pytest.approx(1.0)
    assert len(np.unique(a)) == 6


def test_rank_rows_matches_double_argsort():
    x = torch.randn(3, 7, 7, generator=torch.Generator().manual_seed(0))
    expected = x.argsort(-1).argsort(-1).float() / 6
    torch.testing.assert_close(grn._rank_rows(x), expected)


def test_apc_removes_hub_structure_and_keeps_pairs():
    rng = np.random.default_rng(0)
    hub = rng.random(30) + 0.5
    product = np.outer(hub, hub)  # only "how much each gene attends / is attended"
    off = ~np.eye(30, dtype=bool)
    assert grn.apc(product)[off].std() < 0.1 * product[off].std()
    t = _block_truth(n_blocks=3, size=5, background=15)
    with_pairs = product + 0.5 * t
    assert gm.evaluate_edges(grn.apc(with_pairs), t).auprc == pytest.approx(1.0)
    assert (
        gm.evaluate_edges(with_pairs, t).auprc < 0.9
    )  # hubs hide the pairs without the correction


def test_top_edges_lists_highest_pairs_with_truth():
    s = np.zeros((4, 4))
    s[0, 2] = s[2, 0] = 0.9
    s[1, 3] = s[3, 1] = 0.5
    t = np.zeros((4, 4), bool)
    t[0, 2] = t[2, 0] = True
    rows = gm.top_edges(s, ["a", "b", "c", "d"], 2, t, np.array([0, -1, 0, -1]))
    assert [(r["gene_a"], r["gene_b"], r["planted"]) for r in rows] == [
        ("a", "c", "yes"),
        ("b", "d", "no"),
    ]
    assert rows[0]["module_a"] == 0 and rows[1]["module_b"] == -1


# ----------------------------------------------------------------------------------------------- truth


def test_planted_network_matches_the_census_truth(census, truth, cells):
    genes = list(cells.var_names)
    assert len(truth.modules) == TINY_CENSUS.n_modules
    t = truth.edge_matrix(genes)
    assert (t == t.T).all() and not t.diagonal().any()
    assert t.sum() // 2 == TINY_CENSUS.n_modules * 45  # C(10, 2) edges per module
    labels = truth.module_labels(genes)
    assert (labels >= 0).sum() == TINY_CENSUS.n_modules * TINY_CENSUS.genes_per_module
    # An edge joins two genes of the same module.
    i, j = np.nonzero(t)
    assert (labels[i] == labels[j]).all()

    ct = "celltype_000"
    active = truth.module_ids(ct)
    assert len(active) == TINY_CENSUS.modules_per_type
    ta = truth.edge_matrix(genes, ct)
    assert ta.sum() // 2 == len(active) * 45 and not (ta & ~t).any()
    assert set(truth.module_labels(genes, ct)) - {-1} == set(active)

    # Subsets of genes keep only the edges among them.
    assert truth.edge_matrix(genes[:300]).sum() == t[:300, :300].sum()


def test_find_truth_next_to_census_or_experiment(census, tmp_path):
    assert gm.find_truth(census) == Path(str(census) + ".ground_truth.json")
    assert gm.find_truth(experiment_uri(census)) == gm.find_truth(census)
    with pytest.raises(FileNotFoundError, match="--truth"):
        gm.find_truth(tmp_path / "no_census")
    bad = tmp_path / "bad.json"
    bad.write_text('{"marker_genes": {}}')
    with pytest.raises(ValueError, match="coexpression_edges"):
        gm.PlantedNetwork.load(bad)


# ----------------------------------------------------------------------------------------------- baseline


def test_correlation_baseline_recovers_active_modules(cells, truth):
    ct = "celltype_000"
    sub = cells[cells.obs[keys.OBS_CELL_TYPE] == ct]
    genes = grn.select_genes(sub, 0.05)
    corr = grn.correlation_scores(sub, genes)
    assert corr.shape == (len(genes), len(genes))
    np.testing.assert_allclose(corr, corr.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(corr), 1.0)

    active = gm.evaluate_edges(corr, truth.edge_matrix(genes, ct))
    assert active.auprc_ratio > 100 and active.early_precision > 0.5
    programs = grn.leiden_programs(corr, k=10, resolution=1.0)
    assert gm.program_recovery(programs, truth.module_labels(genes, ct)).ari > 0.8
    # Modules inactive in this cell type do not co-vary in its cells: far weaker on all planted edges.
    overall = gm.evaluate_edges(corr, truth.edge_matrix(genes))
    assert overall.auprc < active.auprc

    # The expression-level null control knows no pairs.
    null = gm.evaluate_edges(grn.expression_level_scores(sub, genes), truth.edge_matrix(genes, ct))
    assert null.auprc < active.auprc / 10

    # Against numpy's own Pearson on the log-normalized values.
    Y = log_normalize(sub.X)[:, sub.var_names.get_indexer(genes[:20])].toarray()
    np.testing.assert_allclose(corr[:20, :20], np.corrcoef(Y.T), atol=1e-9)


def test_select_genes_filters_and_caps(cells):
    genes = grn.select_genes(cells, 0.05)
    X = cells.X.toarray()
    det = (X > 0).mean(0)
    assert set(genes) == set(cells.var_names[det >= 0.05])
    capped = grn.select_genes(cells, 0.05, max_genes=50)
    assert len(capped) == 50 and set(capped) <= set(genes)
    with pytest.raises(ValueError, match="--min-detection"):
        grn.select_genes(cells[:20, :1], 0.0)


# ----------------------------------------------------------------------------------------------- model


def test_layer_qkv_reproduces_the_models_attention(random_model, cells):
    model = random_model.model
    table = tokenize_anndata(cells[:5], random_model.vocab, random_model.config.data.tokenizer)
    b = collate(table, random_model.vocab.pad_id)
    seen = {}
    for layer in (0, -1):
        attn = model.transformer_encoder.layers[layer].self_attn
        handle = attn.register_forward_hook(lambda _m, _a, out: seen.update(out=out))
        try:
            q, k, v, packing = grn.layer_qkv(model, layer, b)
        finally:
            handle.remove()
        cu = packing.cu_seqlens.tolist()
        outs = []
        for lo, hi in zip(cu[:-1], cu[1:], strict=True):
            logits = q[lo:hi].transpose(0, 1) @ k[lo:hi].permute(1, 2, 0)  # (H, L, L)
            probs = (logits / q.shape[-1] ** 0.5).softmax(-1)
            o = probs @ v[lo:hi].transpose(0, 1)  # (H, L, Dh)
            outs.append(o.transpose(0, 1).reshape(hi - lo, -1))  # (L, D)
        manual = attn.out_proj(torch.cat(outs))  # (T, D)
        torch.testing.assert_close(manual, seen["out"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="layers"):
        grn.layer_qkv(model, 5, b)


def test_attention_scores_cover_co_expressed_pairs(random_model, cells):
    sub = cells[cells.obs[keys.OBS_CELL_TYPE] == "celltype_000"][:8].copy()
    genes = grn.select_genes(sub, 0.25, max_genes=120, vocab=random_model.vocab)
    cfg = grn.GrnConfig(attention_passes=1, context_len=len(genes) + 1, batch_size=5)
    scores, count = grn.attention_scores(random_model, sub, genes, cfg)
    # With the whole gene set in context, a pair meets once per cell that expresses both genes.
    E = (sub[:, genes].X.toarray() > 0).astype(float)  # (N, G)
    np.testing.assert_array_equal(count, E.T @ E)
    np.testing.assert_allclose(scores, scores.T)
    off = ~np.eye(len(genes), dtype=bool)
    assert scores[off].min() >= 0.0 and scores[off].max() <= 1.0  # rank-normalised
    assert scores[off].std() > 0.01

    twice = grn.GrnConfig(attention_passes=2, context_len=len(genes) + 1, batch_size=5)
    _, count2 = grn.attention_scores(random_model, sub, genes, twice)
    np.testing.assert_array_equal(count2, 2 * count)

    # A short context: fewer pairs meet; softmax scores are probabilities x context length.
    short = grn.GrnConfig(attention_passes=1, context_len=16, attention_norm="softmax")
    s_short, c_short = grn.attention_scores(random_model, sub, genes, short)
    assert c_short.sum() < count.sum() and np.isfinite(s_short).all()
    assert 0.3 < np.median(s_short[off]) < 3.0

    with pytest.raises(ValueError, match="attention_norm"):
        grn.GrnConfig(attention_norm="max")


def test_gene_embedding_network_finds_modules_the_model_holds(cells, truth, random_model, tmp_path):
    genes = grn.select_genes(cells, 0.05, vocab=random_model.vocab)
    t = truth.edge_matrix(genes)
    labels = truth.module_labels(genes)

    emb = grn.gene_embeddings(random_model, genes)
    assert emb.shape == (len(genes), 32)
    sim = grn.cosine_similarity(emb)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
    assert gm.evaluate_edges(sim, t).auprc_ratio < 3  # an untrained model knows no modules

    planted = load_consolidated(
        write_tiny_model(tmp_path / "m", list(cells.var_names), truth.modules)
    )
    sim = grn.cosine_similarity(grn.gene_embeddings(planted, genes))
    m = gm.evaluate_edges(sim, t)
    assert m.auprc > 0.95 and m.early_precision > 0.9
    programs = grn.leiden_programs(sim, k=10, resolution=1.0)
    assert gm.program_recovery(programs, labels).ari > 0.9

    with pytest.raises(ValueError, match="unknown"):
        grn.gene_embeddings(planted, ["NOT_A_GENE"])

"""GRN task: gene-gene networks from a pretrained model (gene-embedding similarity with Leiden gene programs,
and attention among the genes of one cell state) next to expression-correlation baselines, scored against the
planted co-expression network of a synthetic census.

python -m jobs.finetune grn --checkpoint outputs/synth/run/model --data outputs/synth/census \
    --cell-type celltype_003 --out outputs/grn

The ground truth is `<census>.ground_truth.json` next to the census unless --truth names it. Every method scores
the same gene pairs: genes detected in at least --min-detection of the chosen cell type's cells.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from data_ingest import keys
from scgpt_dist.tasks.config import TaskConfig, arg
from scgpt_dist.tasks.grn import method as grn
from scgpt_dist.tasks.grn import metrics as gm
from scgpt_dist.tasks.runner import TaskContext, load_cells
from scgpt_dist.train.checkpoint import load_consolidated

log = logging.getLogger(__name__)

DESCRIPTION = (
    "gene-embedding network + Leiden gene programs and attention-based gene-gene scores for one cell state, "
    "vs expression correlation, evaluated against a synthetic census's planted network"
)

CELL_TYPE_COLUMN = keys.OBS_CELL_TYPE
"""obs column holding the cell state (`load_cells` copies pbmc68k's labels into it too)."""

EMBEDDING = "scgpt_embedding"
ATTENTION = "scgpt_attention"
CORR_CELLTYPE = "pearson_celltype"
CORR_ALL = "pearson_allcells"
NULL = "expression_null"
METHOD_LABELS = {
    EMBEDDING: "scGPT gene embedding (cosine)",
    ATTENTION: "scGPT attention",
    CORR_CELLTYPE: "Pearson, cell-type cells (baseline)",
    CORR_ALL: "Pearson, all cells (baseline)",
    NULL: "mean expression a + b (null control)",
}
SCOPE_ALL = "all"
SCOPE_ACTIVE = "active"


_D = grn.GrnConfig()


@dataclass
class GrnTaskConfig(TaskConfig):
    """GRN task settings (besides the common ones); the method's own are `grn.GrnConfig`'s."""

    truth: str | None = arg(
        None, "ground truth JSON (default: <data>.ground_truth.json next to a synthetic census)"
    )
    cell_type: str | None = arg(
        None,
        f"cell state (obs `{CELL_TYPE_COLUMN}` value) for attention and the gene set "
        "(default: the most frequent one)",
    )
    min_detection: float = arg(_D.min_detection)
    max_genes: int | None = arg(_D.max_genes)
    knn: int = arg(_D.knn, "neighbours in the gene kNN graph")
    resolution: float = arg(_D.leiden_resolution)
    attention_layer: int = arg(_D.attention_layer)
    attention_norm: str = arg(_D.attention_norm, choices=grn.ATTENTION_NORMS)
    attention_apc: bool = arg(
        False, "average product correction of the attention scores (removes hub-gene stripes)"
    )
    attention_cells: int = arg(_D.attention_cells)
    attention_passes: int = arg(_D.attention_passes)
    context_len: int | None = arg(
        _D.context_len, "tokens per cell for attention (default: the model's training max_seq_len)"
    )
    top_edges: int = arg(15, "rows per method in the top-edges table")

    def method_config(self) -> grn.GrnConfig:
        return grn.GrnConfig(
            min_detection=self.min_detection,
            max_genes=self.max_genes,
            knn=self.knn,
            leiden_resolution=self.resolution,
            attention_layer=self.attention_layer,
            attention_norm=self.attention_norm,
            attention_apc=self.attention_apc,
            attention_cells=self.attention_cells,
            attention_passes=self.attention_passes,
            context_len=self.context_len,
            seed=self.seed,
        )


def _pick_cell_type(adata, requested: str | None) -> str:
    if CELL_TYPE_COLUMN not in adata.obs:
        raise ValueError(
            f"the data has no obs `{CELL_TYPE_COLUMN}` column; the GRN task needs cell-type labels"
        )
    counts = adata.obs[CELL_TYPE_COLUMN].astype(str).value_counts()
    if requested is None:
        return str(counts.index[0])
    if requested not in counts.index:
        raise ValueError(
            f"--cell-type {requested!r} is not in the data; choose one of {sorted(counts.index)[:20]}"
        )
    return requested


def run(cfg: GrnTaskConfig, ctx: TaskContext) -> dict:
    gcfg = cfg.method_config()
    truth_path = cfg.truth or gm.find_truth(cfg.data)
    truth = gm.PlantedNetwork.load(truth_path)
    adata = load_cells(cfg.data, cfg.obs_filter, cfg.max_cells, cfg.seed)
    cell_type = _pick_cell_type(adata, cfg.cell_type)
    cells = adata[adata.obs[CELL_TYPE_COLUMN].astype(str) == cell_type].copy()

    loaded = None
    if cfg.checkpoint:
        loaded = load_consolidated(cfg.checkpoint)
    genes = grn.select_genes(
        cells, gcfg.min_detection, gcfg.max_genes, loaded.vocab if loaded else None
    )
    log.info("GRN on %d genes, %d %s cells of %d", len(genes), cells.n_obs, cell_type, adata.n_obs)

    scores: dict[str, np.ndarray] = {}
    coverage = float("nan")
    attn_cells = cells
    if loaded is not None:
        scores[EMBEDDING] = grn.cosine_similarity(grn.gene_embeddings(loaded, genes))
        if cells.n_obs > gcfg.attention_cells:
            pick = np.random.default_rng(gcfg.seed).choice(
                cells.n_obs, gcfg.attention_cells, replace=False
            )
            attn_cells = cells[np.sort(pick)].copy()
        scores[ATTENTION], seen = grn.attention_scores(loaded, attn_cells, genes, gcfg)
        off = ~np.eye(len(genes), dtype=bool)
        coverage = float((seen[off] > 0).mean())
    scores[CORR_CELLTYPE] = grn.correlation_scores(cells, genes)
    scores[CORR_ALL] = grn.correlation_scores(adata, genes)
    scores[NULL] = grn.expression_level_scores(cells, genes)

    scopes = {SCOPE_ALL: None, SCOPE_ACTIVE: cell_type}
    truths = {s: truth.edge_matrix(genes, ct) for s, ct in scopes.items()}
    labels = {s: truth.module_labels(genes, ct) for s, ct in scopes.items()}
    scopes = {s: ct for s, ct in scopes.items() if truths[s].any()}
    if not scopes:
        raise ValueError(
            f"no two of the {len(genes)} genes form a planted edge of {truth_path}; check that the "
            "ground truth belongs to --data, or lower --min-detection"
        )

    metrics: dict[str, float] = {
        "n_genes": float(len(genes)),
        "n_cells_celltype": float(cells.n_obs),
        "n_cells_attention": float(attn_cells.n_obs if loaded is not None else 0),
    }
    if loaded is not None:
        metrics["attention_pair_coverage"] = coverage
    rows = []
    programs = {
        m: grn.leiden_programs(s, gcfg.knn, gcfg.leiden_resolution, gcfg.seed)
        for m, s in scores.items()
    }
    for scope in scopes:
        for method, s in scores.items():
            e = gm.evaluate_edges(s, truths[scope])
            p = gm.program_recovery(programs[method], labels[scope])
            rows.append(
                {
                    "method": METHOD_LABELS[method],
                    "truth": _scope_label(scope, cell_type),
                    "AUPRC": e.auprc,
                    "random AUPRC": e.random_auprc,
                    "AUPRC / random": e.auprc_ratio,
                    "early precision": e.early_precision,
                    "EP / random": e.early_precision_ratio,
                    "AUROC": e.auroc,
                    "program ARI": p.ari,
                    "best-match Jaccard": p.best_match_jaccard,
                    "programs": p.n_programs,
                }
            )
            prefix = f"{method}_{scope}"
            metrics |= {
                f"{prefix}_auprc": e.auprc,
                f"{prefix}_auprc_ratio": e.auprc_ratio,
                f"{prefix}_early_precision": e.early_precision,
                f"{prefix}_auroc": e.auroc,
                f"{prefix}_program_ari": p.ari,
                f"{prefix}_program_jaccard": p.best_match_jaccard,
            }
        metrics[f"random_{scope}_auprc"] = rows[-1]["random AUPRC"]
        metrics[f"n_edges_{scope}"] = float(truths[scope].sum() // 2)

    _write_report(
        ctx,
        cfg,
        gcfg,
        cell_type,
        genes,
        cells,
        attn_cells,
        scores,
        truths,
        labels,
        rows,
        programs,
        coverage,
        truth_path,
    )
    return metrics


def _scope_label(scope: str, cell_type: str) -> str:
    return "all planted edges" if scope == SCOPE_ALL else f"edges of modules active in {cell_type}"


def _verdict(rows: list[dict], scope_label: str) -> str:
    """One honest sentence: the best scGPT method against the best baseline on one truth set."""
    sel = [r for r in rows if r["truth"] == scope_label]
    ours = [r for r in sel if r["method"].startswith("scGPT")]
    base = [r for r in sel if "baseline" in r["method"]]
    if not ours or not base:
        return ""
    o = max(ours, key=lambda r: r["AUPRC"])
    b = max(base, key=lambda r: r["AUPRC"])
    word = "beats" if o["AUPRC"] > b["AUPRC"] else "loses to"
    return (
        f"On {scope_label}, the best scGPT score ({o['method']}, AUPRC {o['AUPRC']:.3g}, "
        f"{o['AUPRC / random']:.3g}x random) {word} the best expression-correlation baseline "
        f"({b['method']}, AUPRC {b['AUPRC']:.3g}, {b['AUPRC / random']:.3g}x random)."
    )


def _write_report(
    ctx,
    cfg,
    gcfg,
    cell_type,
    genes,
    cells,
    attn_cells,
    scores,
    truths,
    labels,
    rows,
    programs,
    coverage,
    truth_path,
) -> None:
    rep = ctx.report
    n_active = int((labels.get(SCOPE_ACTIVE, np.array([-1])) >= 0).sum())
    rep.text(
        f"Cell state **{cell_type}**: {cells.n_obs} cells; gene set = {len(genes)} genes detected in "
        f">= {gcfg.min_detection:.0%} of them ({int((labels[SCOPE_ALL] >= 0).sum())} in planted modules, "
        f"{n_active} in modules active in {cell_type}). Ground truth: `{truth_path}`. "
        "Edges are unordered gene pairs; the random AUPRC is the edge density."
    )
    if ATTENTION in scores:
        rep.text(
            f"Attention: layer {gcfg.attention_layer} of the model, {gcfg.attention_norm}-normalised per query"
            f"{', average-product corrected' if gcfg.attention_apc else ''}, "
            f"averaged over heads and {attn_cells.n_obs} cells x {gcfg.attention_passes} tokenizations "
            f"(context {gcfg.context_len or 'as trained'}); {coverage:.1%} of gene pairs met in a context. "
            "Gene embedding: cosine of the gene token embeddings. Programs: Leiden (modularity, "
            f"resolution {gcfg.leiden_resolution}) on a {gcfg.knn}-NN graph of each score matrix."
        )
    rep.table("Edge recovery and gene programs vs the planted network", rows)
    verdicts = [_verdict(rows, _scope_label(s, cell_type)) for s in truths if truths[s].any()]
    rep.text(" ".join(v for v in verdicts if v))

    top_rows = []
    for method in (EMBEDDING, ATTENTION, CORR_CELLTYPE):
        if method not in scores:
            continue
        for r in gm.top_edges(
            scores[method], genes, cfg.top_edges, truths[SCOPE_ALL], labels[SCOPE_ALL]
        ):
            top_rows.append({"method": METHOD_LABELS[method], **r})
    rep.table(
        "Top edges (planted = a planted co-expression edge; module -1 = in no module)", top_rows
    )

    _pr_figure(rep, scores, truths, cell_type)
    _heatmap_figure(rep, scores, labels, cell_type)


def _pr_figure(rep, scores, truths, cell_type) -> None:
    scopes = [s for s in truths if truths[s].any()]
    fig = rep.figure("grn_pr_curves", width=5.5 * len(scopes), height=4.5)
    for i, scope in enumerate(scopes, 1):
        ax = fig.add_subplot(1, len(scopes), i)
        for method, s in scores.items():
            recall, precision = gm.pr_curve(s, truths[scope])
            keep = np.unique(np.linspace(0, len(recall) - 1, 3000).astype(int))  # enough for a plot
            ax.plot(recall[keep], precision[keep], label=METHOD_LABELS[method], lw=1.2)
        density = truths[scope][np.triu_indices(len(truths[scope]), 1)].mean()
        ax.axhline(density, color="grey", ls="--", lw=0.8, label="random")
        ax.set(xlabel="recall", ylabel="precision", title=_scope_label(scope, cell_type))
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()


def _heatmap_figure(rep, scores, labels, cell_type) -> None:
    """Score matrices among planted-module genes ordered by module (active modules first)."""
    mods = labels[SCOPE_ALL]
    active = set(labels.get(SCOPE_ACTIVE, np.array([-1])).tolist()) - {-1}
    genes_in = np.flatnonzero(mods >= 0)
    order = genes_in[np.lexsort((mods[genes_in], [m not in active for m in mods[genes_in]]))]
    methods = [m for m in scores if m != NULL]
    fig = rep.figure("grn_heatmaps", width=4.2 * len(methods), height=4.2)
    for i, method in enumerate(methods, 1):
        ax = fig.add_subplot(1, len(methods), i)
        m = scores[method][np.ix_(order, order)].copy()
        np.fill_diagonal(m, np.nan)
        lo, hi = np.nanpercentile(m, [2, 98])
        ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        bounds = np.flatnonzero(np.diff(mods[order])) + 0.5
        for b in bounds:
            ax.axhline(b, color="white", lw=0.3)
            ax.axvline(b, color="white", lw=0.3)
        ax.set_title(METHOD_LABELS[method], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"planted-module genes ordered by module (modules active in {cell_type} first)", fontsize=9
    )
    fig.tight_layout()

"""Multi-omics (RNA + protein, CITE-seq-like) integration with modality tokens.

The pretrained vocabulary is extended with the protein features (`PROT_<gene>`: new token ids appended, the
pretrained ids unchanged; every pretrained row is copied and a protein's row starts as continued pretraining
starts a new gene: the mean gene row plus a little noise, `warmstart.grow_gene_rows`). Each cell becomes one
token sequence `<cls>`, its RNA genes (binned among the cell's RNA values), then its proteins (binned among the
cell's protein values: proteins have their own count scale), and a per-token modality id (RNA / protein,
`data_ingest.keys.MODALITY_*`) that the model embeds and adds to every token (`model.use_modality`). The model is
finetuned with the integration objectives (GEP + GEPC + ECS + DAR + DSBN, `scgpt_dist.tasks.integration`) and the
joint cell embedding is scored with the scib metrics next to:

- scGPT zero-shot on the RNA tokens (the pretrained model knows no proteins) and, unless `--no-rna-arm`, scGPT
  finetuned the same way on RNA alone (does adding the proteins help?);
- PCA of RNA alone and of RNA + protein (log-normalised HVGs and CLR-normalised proteins, each scaled, then
  concatenated), Harmony on the joint PCA, and totalVI (scvi-tools, joint RNA + protein; `--scvi-epochs 0`
  skips it).

Data: an `.h5ad` with RNA genes and proteins as columns, told apart by var `feature_type` (`Gene Expression` /
`Antibody Capture`) or the `PROT_` name prefix; `python -m data_ingest.synth.multiome` writes one from the
synthetic census's planted truth.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_ingest import keys
from data_ingest.synth.multiome import modality_of_features
from data_ingest.tokenize import TokenizerConfig
from scgpt_dist.inference import embed_table, tokenize_anndata
from scgpt_dist.preprocess import hvg_index, log_normalize
from scgpt_dist.tasks.config import arg
from scgpt_dist.tasks.finetune import run_model, with_labels
from scgpt_dist.tasks.integration import method as ig
from scgpt_dist.tasks.integration import task as integ
from scgpt_dist.tasks.integration.task import IntegrationConfig
from scgpt_dist.tasks.runner import TaskContext, load_cells
from scgpt_dist.train.checkpoint import load_consolidated
from scgpt_dist.train.warmstart import extended_vocab

log = logging.getLogger(__name__)

DESCRIPTION = (
    "multi-omics: RNA + protein with modality tokens and an extended vocabulary; scib metrics vs PCA, "
    "Harmony, totalVI"
)


@dataclass
class MultiomicsConfig(IntegrationConfig):
    """Multi-omics settings: the integration task's, 15 epochs, and the RNA-only arm switch."""

    epochs: int = arg(15, "finetuning epochs")
    no_rna_arm: bool = arg(False, "skip the RNA-only finetuned scGPT arm")


def clr(P: np.ndarray) -> np.ndarray:
    """Centred log-ratio per cell of protein counts (N, P), the usual ADT normalisation."""
    L = np.log1p(np.asarray(P, dtype=np.float64))
    return (L - L.mean(1, keepdims=True)).astype(np.float32)


def joint_pca(
    rna_counts, protein_counts: np.ndarray, n_hvg: int, n_pcs: int, seed: int
) -> np.ndarray:
    """PCA of [scaled log-normalised RNA HVGs, scaled CLR proteins], each block weighted to equal total
    variance so the small protein panel is not drowned by the genes: (N, n_pcs)."""
    logX = log_normalize(rna_counts).toarray().astype(np.float32)
    R = logX[:, hvg_index(logX, n_hvg)]
    R = (R - R.mean(0)) / np.maximum(R.std(0), 1e-8) / np.sqrt(R.shape[1])
    Pn = clr(protein_counts)
    Pn = (Pn - Pn.mean(0)) / np.maximum(Pn.std(0), 1e-8) / np.sqrt(Pn.shape[1])
    from sklearn.decomposition import PCA

    Z = np.hstack([R, Pn])
    n = min(n_pcs, Z.shape[0] - 1, Z.shape[1])
    return PCA(n_components=n, random_state=seed).fit_transform(Z).astype(np.float32)


def concat_tokens(rna: pa.Table, prot: pa.Table) -> pa.Table:
    """Row-wise join of two token tables of the same cells: `<cls>` + RNA tokens + protein tokens (the
    protein table's own `<cls>` is dropped), with a per-token `modality` list column."""
    if rna.num_rows != prot.num_rows:
        raise ValueError(f"{rna.num_rows} RNA rows but {prot.num_rows} protein rows")

    def parts(col):
        arr = col.combine_chunks()
        off = arr.offsets.to_numpy()
        return arr.flatten().to_numpy(zero_copy_only=False), off - off[0]

    out = {}
    rg, ro = parts(rna[keys.GENES])
    pg, po = parts(prot[keys.GENES])
    rn, pn = np.diff(ro), np.diff(po) - 1  # protein counts without <cls>
    offsets = np.concatenate([[0], np.cumsum(rn + pn)]).astype(np.int32)
    src_rna = np.repeat(np.arange(rna.num_rows), rn)
    src_prot = np.repeat(np.arange(prot.num_rows), pn)
    # Destination of each RNA / protein token in the joined flat list.
    dst_rna = offsets[src_rna] + (np.arange(len(src_rna)) - np.repeat(ro[:-1], rn))
    keep_p = np.ones(len(pg), bool)
    keep_p[po[:-1]] = False  # drop each protein row's <cls>
    kept_before = po[:-1] - np.arange(prot.num_rows)  # kept protein tokens before each row
    dst_prot = (
        offsets[src_prot] + rn[src_prot] + (np.arange(len(src_prot)) - np.repeat(kept_before, pn))
    )
    total = int(offsets[-1])
    for name, typ in ((keys.GENES, pa.int32()), (keys.VALUES, pa.int16())):
        r, _ = parts(rna[name])
        p, _ = parts(prot[name])
        flat = np.empty(total, r.dtype)
        flat[dst_rna] = r
        flat[dst_prot] = p[keep_p]
        out[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, typ))
    mod = np.full(total, keys.MODALITY_RNA, np.int8)
    mod[dst_prot] = keys.MODALITY_PROTEIN
    out[keys.MODALITY] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(mod, pa.int8()))
    table = rna
    for name, col in out.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, col)
        else:
            table = table.append_column(name, col)
    return table


def run(cfg: MultiomicsConfig, ctx: TaskContext) -> dict:

    adata = load_cells(cfg.data, cfg.obs_filter, cfg.max_cells, cfg.seed)
    if cfg.label_key not in adata.obs:
        raise ValueError(
            f"--label-key {cfg.label_key!r} is not an obs column; have {list(adata.obs)}"
        )
    modality = modality_of_features(adata.var)
    is_prot = modality == keys.MODALITY_PROTEIN
    if not is_prot.any() or is_prot.all():
        raise ValueError(
            f"--data {cfg.data} needs both RNA genes and proteins as columns (var `feature_type` "
            "`Gene Expression` / `Antibody Capture`, or `PROT_`-prefixed protein names); "
            f"found {int(is_prot.sum())} proteins of {adata.n_vars} features"
        )
    rna, prot = adata[:, ~is_prot].copy(), adata[:, is_prot].copy()
    prot_names = list(prot.var_names.astype(str))
    batch_key = integ.batch_key_of(adata.obs, cfg.batch_key)
    labels = adata.obs[cfg.label_key].astype(str).to_numpy()
    batch_names, batch_codes = np.unique(
        adata.obs[batch_key].astype(str).to_numpy(), return_inverse=True
    )
    base_cfg = integ.baseline_config(cfg)
    P = prot.X.toarray() if hasattr(prot.X, "toarray") else np.asarray(prot.X)
    embeddings, seconds, timed = integ.embedding_timer()

    history: dict[str, list[dict]] = {}
    tok_note = ""
    if cfg.checkpoint:
        loaded = load_consolidated(cfg.checkpoint)
        tok = integ.tokenizer_of(loaded, cfg)
        if tok.max_seq_len <= len(prot_names) + 2:
            raise ValueError(
                f"the checkpoint's max_seq_len {tok.max_seq_len} leaves no room for RNA next to "
                f"{len(prot_names)} proteins; use a panel of fewer proteins"
            )
        rna_cells = rna
        if cfg.hvg_tokens:
            rna_cells = rna[:, hvg_index(log_normalize(rna.X).toarray(), cfg.hvg_tokens)].copy()
        vocab, added = extended_vocab(loaded.vocab, prot_names)
        rna_only = with_labels(tokenize_anndata(rna_cells, loaded.vocab, tok), batches=batch_codes)
        # Joint: RNA genes get the context left after the whole protein panel (proteins are dense).
        tok_rna = TokenizerConfig(
            **{**tok.__dict__, "max_seq_len": tok.max_seq_len - len(prot_names)}
        )
        tok_prot = TokenizerConfig(**{**tok.__dict__, "max_seq_len": len(prot_names) + 1})
        joint = concat_tokens(
            tokenize_anndata(rna_cells, vocab, tok_rna),
            tokenize_anndata(prot, vocab, tok_prot),
        )
        joint = with_labels(joint, batches=batch_codes)
        tok_note = (
            f" Vocabulary extended by {len(added)} protein tokens ({len(loaded.vocab)} -> {len(vocab)} "
            f"ids); joint sequences: <cls> + up to {tok_rna.max_seq_len - 1} RNA genes + "
            f"{len(prot_names)} proteins, per-token modality ids."
        )
        timed("scgpt_zeroshot_rna", lambda: embed_table(loaded, rna_only))

        t0 = time.perf_counter()
        model = integ.adapt_for_integration(
            loaded, len(batch_names), cfg, vocab=vocab, use_modality=True
        )
        history["scgpt_finetuned_joint"] = integ.train_for_integration(
            model, joint, cfg, ctx, "scgpt_finetuned_joint"
        )
        embeddings["scgpt_finetuned_joint"] = run_model(model, joint)["cell_emb"]
        seconds["scgpt_finetuned_joint"] = time.perf_counter() - t0
        if not cfg.no_rna_arm:
            t0 = time.perf_counter()
            model = integ.adapt_for_integration(loaded, len(batch_names), cfg)
            history["scgpt_finetuned_rna"] = integ.train_for_integration(
                model, rna_only, cfg, ctx, "scgpt_finetuned_rna"
            )
            embeddings["scgpt_finetuned_rna"] = run_model(model, rna_only)["cell_emb"]
            seconds["scgpt_finetuned_rna"] = time.perf_counter() - t0

    timed("pca_rna", lambda: ig.pca_baseline(rna.X, base_cfg))
    timed("pca_joint", lambda: joint_pca(rna.X, P, cfg.n_hvg, cfg.n_pcs, cfg.seed))
    timed(
        "harmony_joint", lambda: ig.harmony_baseline(embeddings["pca_joint"], batch_codes, base_cfg)
    )
    if cfg.scvi_epochs > 0:
        timed(
            "totalvi",
            lambda: ig.totalvi_baseline(rna.X, P, batch_codes, base_cfg, protein_names=prot_names),
        )

    rows, metrics = integ.score_methods(embeddings, labels, batch_names[batch_codes], seconds, cfg)
    rep = ctx.report
    rep.text(
        f"{adata.n_obs} cells, {rna.n_vars} RNA genes + {len(prot_names)} proteins, "
        f"{len(np.unique(labels))} cell types (`{cfg.label_key}`), {len(batch_names)} batches "
        f"(`{batch_key}`)."
        + (
            f" scGPT finetuned {cfg.epochs} epochs (lr {cfg.lr}, batch {cfg.batch_size}) with GEP + GEPC + "
            f"ECS (threshold {cfg.ecs_threshold}, weight {cfg.ecs_weight}) + DAR (weight {cfg.dar_weight})"
            f"{'' if cfg.no_dsbn else ' + DSBN'}, mask ratio {cfg.mask_ratio}.{tok_note}"
            if cfg.checkpoint
            else " No checkpoint given: baselines only."
        )
        + " Baselines: PCA of RNA alone and of RNA + CLR protein (blocks scaled to equal variance), Harmony "
        "on the joint PCA"
        + (f", totalVI ({cfg.scvi_epochs} epochs)." if cfg.scvi_epochs else "; totalVI skipped.")
        + " Overall = 0.6 AvgBIO + 0.4 AvgBATCH."
    )
    rep.table("scib metrics on the joint embedding (sorted by overall)", rows)
    if cfg.checkpoint:
        rep.text(integ.verdict(rows, "scgpt_finetuned_joint"))
        if "scgpt_finetuned_rna/overall" in metrics:
            rep.text(
                "Adding the proteins (modality tokens) changed the finetuned scGPT's overall score from "
                f"{metrics['scgpt_finetuned_rna/overall']:.3f} (RNA only) to "
                f"{metrics['scgpt_finetuned_joint/overall']:.3f}; AvgBIO "
                f"{metrics['scgpt_finetuned_rna/avg_bio']:.3f} -> {metrics['scgpt_finetuned_joint/avg_bio']:.3f}."
            )
    for method, h in history.items():
        metrics.update({f"{method}/final_{k}": v for k, v in h[-1].items()})
    if history:
        fig = rep.figure("finetune_loss", 6, 3.5)
        ax = fig.add_subplot(111)
        for method, h in history.items():
            ax.plot(range(1, len(h) + 1), [e["loss"] for e in h], marker="o", label=method)
        ax.set_xlabel("epoch")
        ax.set_ylabel("total training loss")
        ax.legend(fontsize=7)
    if not cfg.no_umap:
        integ.add_umaps(rep, "umap", embeddings, labels, batch_names[batch_codes], cfg.seed)
    return metrics

"""The re-pretraining gate: candidate and promoted model on the same fixed held-out cells (GEP on old and new
data, zero-shot kNN cell-type accuracy), and the decision with every check's numbers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa

from data_ingest import keys
from data_ingest.datasource import read_token_table
from data_ingest.source import HOLDOUT, SomaCellSource, open_experiment
from scgpt_dist.evaluate import gep_baselines, knn_accuracy, model_scores, with_fixed_masks
from scgpt_dist.inference import embed_table
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train.checkpoint import LoadedModel, load_consolidated
from scgpt_dist.train.warmstart import warm_start_state


def _baseline(promoted, candidate, batch_categories):
    """The promoted model as a LoadedModel with the candidate's shapes: identical on the genes and batches
    it knows, average rows for new ones (the warm start with zero noise)."""
    state, _ = warm_start_state(
        promoted, candidate.vocab, candidate.model.cfg, batch_categories, noise=0.0
    )
    model = build_model(candidate.model.cfg, len(candidate.vocab), candidate.vocab.pad_id)
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model=model, config=candidate.config, vocab=candidate.vocab, meta={})


def evaluate_gate(cand_cfg, model_dir: str, promoted, new_datasets, gate) -> dict:
    """Held-out GEP MSE on old and new data and kNN cell-type accuracy, for the candidate and (when there
    is one) the promoted model, on the same cells, tokens and masks."""
    candidate = load_consolidated(model_dir)
    models = {"candidate": candidate}
    # Tokens of the genes the promoted model knows (same ids in both vocabularies): identical inputs.
    vocab = candidate.vocab if promoted is None else promoted.vocab
    source = SomaCellSource(cand_cfg.data.source)
    held = source.resolve(vocab, HOLDOUT)
    held = dataclasses.replace(held, batch_categories=candidate.meta["data"]["batch_categories"])
    if promoted is not None:
        models["promoted"] = _baseline(promoted, candidate, held.batch_categories)
    with open_experiment(held.soma_uri, held.tiledb_config) as exp:
        obs = (
            exp.obs.read(coords=(held.joinids,), column_names=[keys.SOMA_JOINID, held.batch_key])
            .concat()
            .to_pandas()
        )
    dataset = obs.set_index(keys.SOMA_JOINID)[held.batch_key].astype(str).reindex(held.joinids)
    is_new = dataset.isin(set(new_datasets or [])).to_numpy()
    parts = {
        "old": held.joinids[~is_new][: gate.eval_cells],
        "new": held.joinids[is_new][: gate.eval_cells],
    }
    tok = candidate.config.data.tokenizer
    tables = {
        k: with_fixed_masks(
            read_token_table(held, ids, tok, vocab.cls_id), gate.mask_ratio, gate.seed
        )
        for k, ids in parts.items()
        if len(ids)
    }
    both = pa.concat_tables(list(tables.values()))
    metrics: dict = {"per_gene_mean_reference": {}}
    for part, table in tables.items():
        metrics[part] = {"n_cells": table.num_rows}
        for name, loaded in models.items():
            se, n, _ = model_scores(loaded.model, loaded.vocab.pad_id, table, embed=False)
            metrics[part][f"{name}_mse"] = se / max(n, 1)
        # The reference scale: each gene's mean over both parts' cells, on the same positions.
        baselines = gep_baselines(both, table, candidate.vocab.pad_id)
        metrics["per_gene_mean_reference"][part] = baselines["per_gene_mean"]
    labels = both[keys.LABEL].to_numpy()
    metrics["knn"] = {"n_cells": both.num_rows}
    if len(np.unique(labels)) >= 2 and both.num_rows >= 4:
        for name, loaded in models.items():
            emb = embed_table(loaded, both)  # (N, D)
            metrics["knn"][name] = knn_accuracy(emb, labels, k=gate.knn_k, seed=gate.seed)
    return metrics


def decide(metrics: dict, gate, has_promoted: bool) -> tuple[bool, list[str]]:
    """(passed, reasons): every check with its numbers, failing ones first."""
    fails, passes = [], []

    def check(ok: bool, text: str) -> None:
        (passes if ok else fails).append(("ok: " if ok else "FAIL: ") + text)

    for part in ("old", "new"):
        m = metrics.get(part)
        if m is not None:
            check(
                math.isfinite(m["candidate_mse"]),
                f"{part}-data GEP MSE {m['candidate_mse']:.4g} finite",
            )
    if not has_promoted:
        passes.append("ok: first version (no promoted model to compare with)")
        return not fails, fails + passes
    for part, ratio in (("old", gate.max_old_loss_ratio), ("new", gate.max_new_loss_ratio)):
        m = metrics.get(part)
        if m is None:
            check(part == "old", f"no held-out cells of the {part} data to evaluate")
            continue
        limit = m["promoted_mse"] * ratio
        check(
            m["candidate_mse"] <= limit,
            f"{part}-data GEP MSE {m['candidate_mse']:.4g} <= promoted {m['promoted_mse']:.4g} x {ratio} "
            f"= {limit:.4g} ({m['n_cells']} cells)",
        )
    knn = metrics.get("knn", {})
    if "candidate" in knn and "promoted" in knn:
        floor = knn["promoted"] - gate.max_knn_drop
        check(
            knn["candidate"] >= floor,
            f"kNN accuracy {knn['candidate']:.3f} >= promoted {knn['promoted']:.3f} - "
            f"{gate.max_knn_drop} = {floor:.3f}",
        )
    return not fails, fails + passes


def flat_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                out[f"gate.{k}.{kk}"] = float(vv)
    return out

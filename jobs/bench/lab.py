"""Learning lab: one process, the project's tokenizer, model, masking, losses and evaluation, in-memory data.

    python -m jobs.bench lab [--data census|exact|splat] [--cells 20000] [--genes 2000] [recipe options] [--out f.json]

For finding out *why* a recipe learns or not, cheaply and with nothing between the model and the data (no
Ray, DeepSpeed or SOMA; `python -m jobs.bench learn` measures the real pipeline). Two data sets:

- `census`: the synthetic census generator's cells (`data_ingest.synth.sample_census`: planted cell-type
  marker programs, co-expression modules, dataset batch effects, negative-binomial counts), one tissue so
  every dataset holds every type;
- `exact`: every cell expresses the same genes and each gene's count is a fixed function of the cell type,
  so a masked value is exactly predictable from the visible ones (the per-gene x type mean scores 0): a model
  that uses context must get close to zero; the gene set says nothing about the type, only the values do;
- `splat`: an independent simulator (`data_ingest.synth.splat`, the Splat model of Splatter), to check that a
  recipe is not tuned to our own generator (`--synth` then takes SplatConfig fields).

Every `--eval-every` steps it prints held-out GEP MSE (fixed masks) next to the per-gene, per-gene x batch and
per-gene x type means, and the `<cls>` embedding's cosine kNN cell-type and batch accuracy and mean pairwise
cosine. The experiments in docs/learning.md were run with it.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch

from data_ingest import keys
from data_ingest.synth.census import CensusSynthConfig, sample_census
from data_ingest.synth.splat import SplatConfig, simulate
from data_ingest.tokenize import RESTYLE_DEPTHS, TokenizerConfig, tokenize_csr
from data_ingest.views import (
    attach_views,
    batch_log_depths,
    batch_log_profile,
    thin_csr,
    view_tokenizer,
)
from scgpt_dist.config import ModelConfig, ObjectiveConfig, TrainConfig
from scgpt_dist.evaluate import embedding_scores, gep_baselines, model_scores, with_fixed_masks
from scgpt_dist.model.collate import collate, mask_values
from scgpt_dist.model.losses import cce_loss
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train.module import compute_loss, lr_lambda, param_groups

PAD_ID, CLS_ID, N_SPECIAL = 0, 1, 3


def exact_cells(
    n_cells: int, n_genes: int, n_types: int, n_datasets: int, seed: int = 0, n_expr: int = 200
):
    """Every cell expresses the same `n_expr` genes; a gene's count is its rank in a fixed per-type order."""
    rng = np.random.default_rng(seed)
    n_expr = min(n_expr, n_genes)
    genes = np.sort(rng.choice(n_genes, n_expr, replace=False))
    levels = np.stack([rng.permutation(n_expr) + 1 for _ in range(n_types)]).astype(np.float32)
    types = rng.integers(0, n_types, n_cells)
    datasets = np.sort(rng.integers(0, n_datasets, n_cells))
    X = sp.csr_matrix(
        (levels[types].ravel(), np.tile(genes, n_cells), np.arange(n_cells + 1) * n_expr),
        shape=(n_cells, n_genes),
    )
    return X, types, datasets


def token_table(X: sp.csr_matrix, types, datasets, tok: TokenizerConfig, cells=None) -> pa.Table:
    """The project's tokenizer on CSR counts (gene j -> token j + 3), with label and batch ids; cell ids
    `cells` (default: the row numbers)."""
    return tokenize_csr(
        X.indptr,
        X.indices,
        X.data,
        np.arange(X.shape[0]) if cells is None else cells,
        np.arange(X.shape[1]) + N_SPECIAL,
        tok,
        CLS_ID,
        batch=datasets,
        labels=types,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.bench lab", description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--data", choices=("census", "exact", "splat"), default="census")
    add("--cells", type=int, default=20000)
    add("--genes", type=int, default=2000)
    add("--types", type=int, default=12)
    add("--datasets", type=int, default=8)
    add("--synth", default="{}", help="extra CensusSynthConfig fields as JSON")
    add("--max-len", type=int, default=256)
    add("--select", choices=("random", "top"), default="top", help="tokenizer.gene_selection")
    add("--tie", choices=("random", "mid"), default="mid", help="tokenizer.tie_break")
    add("--zeros", action="store_true", help="tokenizer.include_zero_genes")
    add("--style", default="category", help="model.input_emb_style")
    add("--init", default="small", help="model.init")
    add("--d", type=int, default=64)
    add("--layers", type=int, default=3)
    add("--heads", type=int, default=4)
    add("--dropout", type=float, default=0.1)
    add("--model", default="{}", help="extra ModelConfig fields as JSON")
    add(
        "--value-gain",
        type=float,
        default=1.0,
        help="initial gain of the value embedding's LayerNorm",
    )
    add("--objectives", default="{}", help="extra ObjectiveConfig fields as JSON")
    add(
        "--thin",
        type=float,
        default=0.0,
        help="contrastive views from binomially thinned counts: keep each count with this probability, "
        "twice independently, re-tokenise, and pull the two views' cell embeddings together (InfoNCE "
        "over the batch); 0 = off",
    )
    add(
        "--view",
        type=float,
        default=0.0,
        help="tokenizer.thinned_view as the pipeline does it: two copies of each training cell's counts, "
        "each count kept with this probability, each tokenised afresh (objectives.cce_view=thinned "
        "contrasts the two); 0 = off",
    )
    add("--view-len", type=int, default=0, help="tokenizer.view_max_seq_len (0: --max-len)")
    add(
        "--restyle",
        action="store_true",
        help="tokenizer.view_restyle: each view thinned towards a random batch's gene profile",
    )
    add(
        "--restyle-depth",
        choices=RESTYLE_DEPTHS,
        default="dataset",
        help="tokenizer.view_restyle_depth: a view takes the target batch's median depth (dataset), "
        "a random cell's depth of it (cell) or keeps its own (off)",
    )
    add("--thin-weight", type=float, default=1.0, help="weight of the thinned-views contrast")
    add("--thin-temp", type=float, default=0.1, help="its temperature")
    add("--mask", type=float, default=0.4)
    add("--lr", type=float, default=3e-3)
    add("--weight-decay", type=float, default=0.01)
    add("--decay-all", action="store_true", help="train.weight_decay_all")
    add("--schedule", default="constant", help="train.lr_schedule")
    add("--warmup", type=int, default=100)
    add("--steps", type=int, default=1200)
    add("--batch", type=int, default=32)
    add("--eval-every", type=int, default=200)
    add("--eval-cells", type=int, default=2000)
    add("--threads", type=int, default=1)
    add("--seed", type=int, default=0)
    add("--out", default=None, help="write the history as JSON here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if a.data == "census":
        synth = CensusSynthConfig(
            n_cells=a.cells, n_genes=a.genes, n_datasets=a.datasets, n_tissues=1,
            n_cell_types=a.types, types_per_tissue=a.types, seed=a.seed, **json.loads(a.synth),
        )  # fmt: skip
        X, types, datasets = sample_census(synth)
    elif a.data == "splat":
        sim = simulate(
            SplatConfig(
                n_cells=a.cells, n_genes=a.genes, n_groups=a.types, n_batches=a.datasets,
                seed=a.seed, **json.loads(a.synth),
            )
        )  # fmt: skip
        X = sp.csr_matrix(sim.X)
        types = sim.obs[keys.OBS_CELL_TYPE].astype("category").cat.codes.to_numpy()
        datasets = sim.obs[keys.OBS_DATASET].astype("category").cat.codes.to_numpy()
    else:
        X, types, datasets = exact_cells(a.cells, a.genes, a.types, a.datasets, a.seed)
    tok = TokenizerConfig(
        max_seq_len=a.max_len,
        gene_selection=a.select,
        tie_break=a.tie,
        include_zero_genes=a.zeros,
        view_max_seq_len=a.view_len,
    )
    table = token_table(X, types, datasets, tok)
    rng = np.random.default_rng(a.seed)
    perm = rng.permutation(table.num_rows)
    n_test = min(a.eval_cells, table.num_rows // 5)
    test, train = np.sort(perm[:n_test]), perm[table.num_rows // 5 :]
    held = with_fixed_masks(table.take(pa.array(test)), a.mask, a.seed)
    base = gep_baselines(table.take(pa.array(train)), held, PAD_ID)
    print(
        f"data {X.shape[0]} x {X.shape[1]}, {X.getnnz(1).mean():.0f} expressed genes per cell, "
        f"{np.mean(X.data == 1):.0%} of non-zero counts are 1; baselines "
        + " ".join(f"{k} {v:.2f}" for k, v in base.items())
        + f" ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    torch.manual_seed(a.seed)
    mcfg = ModelConfig(
        d_model=a.d, n_heads=a.heads, n_layers=a.layers, d_hid=2 * a.d, dropout=a.dropout,
        input_emb_style=a.style, init=a.init, n_batches=a.datasets, **json.loads(a.model),
    )  # fmt: skip
    model = build_model(mcfg, X.shape[1] + N_SPECIAL, PAD_ID)
    if a.value_gain != 1.0:
        model.value_encoder.enc_norm.weight.data.fill_(a.value_gain)
    obj = ObjectiveConfig(mask_ratio=a.mask, **json.loads(a.objectives))
    tcfg = TrainConfig(
        lr=a.lr, weight_decay=a.weight_decay, weight_decay_all=a.decay_all,
        lr_schedule=a.schedule, warmup_steps=a.warmup, max_steps=a.steps,
    )  # fmt: skip
    opt = torch.optim.AdamW(param_groups(model, tcfg), lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg))
    labels, batches = held[keys.LABEL].to_numpy(), held[keys.BATCH].to_numpy()

    def evaluate(step: int, running: dict) -> dict:
        se, n, emb = model_scores(model, PAD_ID, held, generative=obj.generative)
        row = {"step": step, "gep": se / n, **running, "s": round(time.perf_counter() - t1)}
        row.update(embedding_scores(emb, labels, batches, seed=a.seed, metric="cosine"))
        print(
            " ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            ),
            flush=True,
        )
        return row

    profile = log_depths = None
    if (
        a.restyle
    ):  # each batch's profile over the training cells, as attach_batch_profile measures it
        train_cells = table.column(keys.CELL_ID).to_numpy()[train]
        n_batches = int(datasets.max()) + 1
        profile = batch_log_profile(
            X[train_cells], datasets[train_cells], n_batches, depth=a.restyle_depth == "dataset"
        )
        if a.restyle_depth == "cell":
            lib = np.asarray(X[train_cells].sum(axis=1)).ravel()
            log_depths = batch_log_depths(lib, datasets[train_cells], n_batches)
    gen = torch.Generator().manual_seed(a.seed)
    t1 = time.perf_counter()
    history = [evaluate(0, {})]
    running: dict[str, float] = {}
    for step in range(1, a.steps + 1):
        rows = train[rng.integers(0, len(train), a.batch)]
        records = table.take(pa.array(rows))
        if a.view > 0:  # as the read tasks do it (tokenizer.thinned_view)
            cells = records.column(keys.CELL_ID).to_numpy()
            halves = []
            for v in range(2):
                restyle = None if profile is None else (profile, datasets[cells])
                Xv = thin_csr(
                    X[cells],
                    a.view,
                    a.seed,
                    cells,
                    np.full(len(cells), step),
                    v,
                    restyle,
                    log_depths,
                )
                halves.append(
                    token_table(Xv, types[cells], datasets[cells], view_tokenizer(tok), cells)
                )
            records = attach_views(records, halves)
        b = collate(records, PAD_ID)
        values_in, mask = mask_values(b.values, a.mask, gen)
        loss, parts = compute_loss(model, b, values_in, mask, obj, generator=gen)
        if a.thin > 0:
            rows = train[rng.integers(0, len(train), a.batch)]
            embs = []
            for _ in range(2):
                Xv = X[rows].copy()
                Xv.data = rng.binomial(Xv.data.astype(np.int64), a.thin).astype(np.float32)
                Xv.eliminate_zeros()
                v = collate(token_table(Xv, types[rows], datasets[rows], tok), PAD_ID)
                embs.append(model(v.genes, v.values, v.padding, v.batch)["cell_emb"])
            contrast = 0.5 * (
                cce_loss(embs[0], embs[1], a.thin_temp) + cce_loss(embs[1], embs[0], a.thin_temp)
            )
            loss = loss + a.thin_weight * contrast
            parts["thin"] = contrast.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        for k, v in parts.items():  # exponential moving averages of the training losses
            running[f"train_{k}"] = 0.98 * running.get(f"train_{k}", float(v)) + 0.02 * float(v)
        if step % a.eval_every == 0 or step == a.steps:
            history.append(evaluate(step, running))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "baselines": base, "history": history}, f, indent=1)
    if math.isnan(history[-1]["gep"]):
        raise ValueError("the run diverged (NaN loss); lower --lr")
    return 0

"""Perturbation response prediction, scGPT style, with the split, baselines and metrics it is judged by.

**Model** (after the reference perturbation tutorial, GEARS data conventions): the input is a control cell's
expression over a fixed context of G genes with a per-gene perturbation flag (1 on the perturbed genes, 0
elsewhere; the perturbed genes are always in the context, also where the control cell has zero counts); the
target is the expression of a perturbed cell over the same genes; the loss is the MSE of the GEP head's output
on every context gene (expressed or not). The model is the pretrained checkpoint adapted with
`adapt_model(..., use_perturbation=True)` (a fresh flag embedding; every other weight pretrained).

Value choice: the **input** values are the control cell's bins (per-cell quantile bins over the context genes,
as in pretraining, so the pretrained value encoder sees what it was trained on; the reference feeds log1p
values into a model pretrained on bins). The **target** is continuous log1p(library-normalized to 1e4) values,
as in the reference (binned targets are per-cell ranks, whose means do not measure a fold change); the
GEP head's last layer is first rescaled from bins to log1p by a least-squares fit on control cells. Each
perturbed training cell is paired with a random control cell each epoch (and control cells with other control
cells, flags all 0), so the model learns E[perturbed | control]; a perturbation's predicted mean response is
the mean output over `n_pred_controls` control cells.

**Metrics** (GEARS / scGPT): Pearson delta = correlation over genes of (predicted mean - control mean) with
(true mean - control mean), on all context genes and on the top-20 DE genes (|Welch t| of the perturbation's
cells vs control cells); MSE of the predicted mean on the same gene sets. A constant change (no-change
baseline) has no Pearson delta (n/a).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from data_ingest import keys
from data_ingest.binning import bin_cell
from scgpt_dist import preprocess
from scgpt_dist.model.transformer import ScGPT
from scgpt_dist.tasks.finetune import LoopConfig, adapt_model, train_epochs
from scgpt_dist.train.checkpoint import LoadedModel

log = logging.getLogger(__name__)

NORMALIZE_TARGET_SUM = preprocess.TARGET_SUM
"""Library size the log1p target values are normalized to (scanpy / GEARS convention)."""

# ------------------------------------------------------------------------------------------------- data


def is_double(name: str) -> bool:
    return len(targets_of(name)) == 2


def targets_of(name: str) -> list[str]:
    """Target genes of a GEARS-style perturbation name (`A+ctrl`, `A+B`; `ctrl` -> [])."""
    return [g for g in name.split(keys.PERT_SEPARATOR) if g and g != keys.CONTROL_CONDITION]


@dataclass
class PerturbationSplit:
    """Which perturbations train the model and which test it (no target gene of a test single is trained on)."""

    train: list[str]
    unseen_single: list[str]
    """Single perturbations whose target gene appears in no training perturbation."""
    double_seen: list[str]
    """Held-out doubles whose two singles are both in training (where the additive model applies)."""
    double_unseen: list[str]
    """Held-out doubles with at least one unseen single."""

    def groups(self) -> dict[str, list[str]]:
        """Test groups with at least one perturbation."""
        groups = {
            "unseen_single": self.unseen_single,
            "double_seen": self.double_seen,
            "double_unseen": self.double_unseen,
        }
        return {k: v for k, v in groups.items() if v}


def split_perturbations(
    names: list[str],
    unseen_fraction: float = 0.25,
    double_test_fraction: float = 0.5,
    seed: int = 0,
) -> PerturbationSplit:
    """Split perturbation names: `unseen_fraction` of the singles are test singles (their genes are then in no
    training perturbation); of the doubles made of training singles, `double_test_fraction` are held out; the
    other doubles with an unseen gene are held out too."""
    rng = np.random.default_rng(seed)
    singles = sorted(n for n in names if len(targets_of(n)) == 1)
    doubles = sorted(n for n in names if is_double(n))
    if len(singles) < 2:
        raise ValueError(
            f"{len(singles)} single perturbations; the split needs at least 2 (one to train, one to test)"
        )
    n_unseen = min(len(singles) - 1, max(1, int(round(unseen_fraction * len(singles)))))
    order = rng.permutation(len(singles))
    unseen = sorted(singles[i] for i in order[:n_unseen])
    train_singles = sorted(singles[i] for i in order[n_unseen:])
    unseen_genes = {g for n in unseen for g in targets_of(n)}
    seen_genes = {g for n in train_singles for g in targets_of(n)}
    double_unseen = sorted(d for d in doubles if set(targets_of(d)) & unseen_genes)
    seen_pairs = [d for d in doubles if set(targets_of(d)) <= seen_genes]
    n_test = int(round(double_test_fraction * len(seen_pairs)))
    if seen_pairs and double_test_fraction > 0:
        n_test = max(1, n_test)
    order = rng.permutation(len(seen_pairs))
    double_seen = sorted(seen_pairs[i] for i in order[:n_test])
    train_doubles = sorted(seen_pairs[i] for i in order[n_test:])
    return PerturbationSplit(
        train=train_singles + train_doubles,
        unseen_single=unseen,
        double_seen=double_seen,
        double_unseen=double_unseen,
    )


@dataclass
class ResponseData:
    """Log-normalized cells over the context genes: control cells and each perturbation's cells."""

    genes: list[str]
    """Context genes (G), the perturbation targets first."""
    ctrl: np.ndarray
    """(n_control, G) control cells."""
    cells: dict[str, np.ndarray]
    """Perturbation name -> (n_cells, G)."""

    @property
    def ctrl_mean(self) -> np.ndarray:
        return self.ctrl.mean(0)  # (G,)

    def mean(self, name: str) -> np.ndarray:
        return self.cells[name].mean(0)  # (G,)

    def gene_index(self, names: list[str]) -> list[int]:
        pos = {g: i for i, g in enumerate(self.genes)}
        return [pos[g] for g in names]


def build_response_data(
    X_log: sp.csr_matrix,
    gene_names: list[str],
    perturbation: np.ndarray,
    fit_perturbations: list[str],
    n_genes: int,
    allowed_genes: set[str] | None = None,
) -> ResponseData:
    """Choose the context genes and cut the cells to them.

    Context: every perturbation target gene (in `allowed_genes`, e.g. the model's vocabulary), then the genes
    with the highest mean log expression over the control cells and the cells of `fit_perturbations` (training
    data only, so test perturbations do not choose the genes they are scored on), up to `n_genes`.
    """
    perturbation = np.asarray(perturbation).astype(str)
    names = sorted(set(perturbation) - {keys.CONTROL_CONDITION})
    if keys.CONTROL_CONDITION not in set(perturbation):
        raise ValueError(
            f"no control cells: obs `{keys.OBS_PERTURBATION}` has no {keys.CONTROL_CONDITION!r} rows; "
            "the response is measured against control cells"
        )
    pos = {g: i for i, g in enumerate(gene_names)}
    targets = sorted({g for n in names for g in targets_of(n)})
    missing = [
        g for g in targets if g not in pos or (allowed_genes is not None and g not in allowed_genes)
    ]
    if missing:
        raise ValueError(
            f"{len(missing)} perturbation target genes are not in the data's genes or the model's vocabulary "
            f"(e.g. {missing[:3]}); drop those perturbations or use a model whose vocabulary has them"
        )
    if n_genes < len(targets):
        raise ValueError(
            f"--n-genes {n_genes} is fewer than the {len(targets)} perturbation targets; raise it"
        )
    fit_rows = np.isin(perturbation, [keys.CONTROL_CONDITION, *fit_perturbations])
    mean = np.asarray(X_log[fit_rows].mean(0)).ravel()  # (n_all_genes,)
    if allowed_genes is not None:
        mean[[i for i, g in enumerate(gene_names) if g not in allowed_genes]] = -np.inf
    mean[[pos[g] for g in targets]] = -np.inf
    rest = [
        int(i)
        for i in np.argsort(-mean, kind="stable")[: n_genes - len(targets)]
        if np.isfinite(mean[i])
    ]
    cols = [pos[g] for g in targets] + rest
    dense = np.asarray(X_log[:, cols].todense(), dtype=np.float32)  # (N, G)
    return ResponseData(
        genes=[gene_names[i] for i in cols],
        ctrl=dense[perturbation == keys.CONTROL_CONDITION],
        cells={n: dense[perturbation == n] for n in names},
    )


# ---------------------------------------------------------------------------------------------- metrics


def de_genes(ctrl: np.ndarray, pert: np.ndarray, k: int = 20) -> np.ndarray:
    """Indices of the `k` genes with the largest |Welch t| between `pert` (n, G) and `ctrl` (m, G) cells."""
    diff = pert.mean(0) - ctrl.mean(0)  # (G,)
    se = np.sqrt(pert.var(0, ddof=1) / len(pert) + ctrl.var(0, ddof=1) / len(ctrl))  # (G,)
    t = np.where(se > 0, np.abs(diff) / np.maximum(se, 1e-12), 0.0)
    return np.argsort(-t, kind="stable")[: min(k, len(t))]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) < 1e-9 or np.std(b) < 1e-9:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def response_metrics(
    pred: np.ndarray, true: np.ndarray, ctrl_mean: np.ndarray, de: np.ndarray
) -> dict[str, float]:
    """Pearson delta and MSE of a predicted mean profile (G,) against the true one, on all genes and on `de`."""
    dp, dt = pred - ctrl_mean, true - ctrl_mean  # (G,)
    return {
        "pearson_delta": _pearson(dp, dt),
        "pearson_delta_de20": _pearson(dp[de], dt[de]),
        "mse": float(np.mean((pred - true) ** 2)),
        "mse_de20": float(np.mean((pred[de] - true[de]) ** 2)),
    }


# -------------------------------------------------------------------------------------------- baselines


def baseline_no_change(data: ResponseData, names: list[str]) -> dict[str, np.ndarray]:
    """Every perturbation predicted as the control mean."""
    return {n: data.ctrl_mean.copy() for n in names}


def baseline_mean_perturbed(
    data: ResponseData, train: list[str], names: list[str]
) -> dict[str, np.ndarray]:
    """Every perturbation predicted as the mean of the training perturbations' mean profiles."""
    mean = np.mean([data.mean(n) for n in train], axis=0)  # (G,)
    return {n: mean.copy() for n in names}


def baseline_additive(
    data: ResponseData, train: list[str], names: list[str]
) -> dict[str, np.ndarray]:
    """Doubles whose two singles are in training: control mean + the sum of the singles' changes."""
    ctrl = data.ctrl_mean
    by_gene = {targets_of(n)[0]: data.mean(n) for n in train if len(targets_of(n)) == 1}
    out = {}
    for n in names:
        genes = targets_of(n)
        if len(genes) == 2 and all(g in by_gene for g in genes):
            out[n] = ctrl + sum(by_gene[g] - ctrl for g in genes)
    return out


def pca_gene_features(data: ResponseData, train: list[str], n_components: int = 10) -> np.ndarray:
    """Each context gene's loadings on the top principal components of the training cells (G, K): the gene
    embedding of the linear baseline of Ahlmann-Eltze et al. (2024)."""
    from sklearn.decomposition import PCA

    X = np.concatenate([data.ctrl] + [data.cells[n] for n in train])  # (N, G)
    k = min(n_components, X.shape[0] - 1, X.shape[1])
    pca = PCA(n_components=k, random_state=0).fit(X)
    return (pca.components_.T * np.sqrt(pca.explained_variance_)).astype(np.float64)  # (G, K)


def baseline_linear(
    data: ResponseData, train: list[str], names: list[str], gene_features: np.ndarray
) -> dict[str, np.ndarray]:
    """Ridge regression (alpha by leave-one-out CV) of a perturbation's mean change from control on the
    sum of its target genes' feature vectors (`gene_features`, (G, K), rows in context order)."""
    from sklearn.linear_model import RidgeCV

    feats = gene_features / np.maximum(np.linalg.norm(gene_features, axis=1, keepdims=True), 1e-12)

    def x_of(n: str) -> np.ndarray:
        return feats[data.gene_index(targets_of(n))].sum(0)  # (K,)

    X = np.stack([x_of(n) for n in train])  # (n_train, K)
    Y = np.stack([data.mean(n) - data.ctrl_mean for n in train])  # (n_train, G)
    model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(X, Y)
    pred = model.predict(np.stack([x_of(n) for n in names]))  # (n, G)
    return {n: data.ctrl_mean + p for n, p in zip(names, pred, strict=True)}


# ------------------------------------------------------------------------------------------------ model


@dataclass
class PerturbationTrainConfig(LoopConfig):
    """Finetuning the perturbation model (the loop's settings, and the pairs it trains on)."""

    epochs: int = 5
    weight_decay: float = 0.01
    """AdamW's default, which this task has always used."""
    control_pairs: float = 0.5
    """Control -> control pairs (flags all 0) added per epoch, as a fraction of the perturbed training cells."""
    calibrate_head: bool = True
    """Before training, rescale the GEP head's last layer by the least-squares fit of the control cells'
    log1p values on its (bin-scale) predictions for them, so finetuning starts on the target's scale."""
    n_pred_controls: int = 300
    """Control cells whose predictions are averaged into a perturbation's predicted mean."""
    losses: list[float] = field(default_factory=list)
    """Filled in: mean training loss per epoch."""


class PerturbationPredictor:
    """A pretrained scGPT with perturbation flags over a fixed gene context."""

    def __init__(
        self,
        loaded: LoadedModel,
        data: ResponseData,
        batch_index: int = 0,
        from_scratch: bool = False,
        seed: int = 0,
    ):
        self.model: ScGPT
        self.model, self.fresh = adapt_model(
            loaded, from_scratch=from_scratch, seed=seed, use_perturbation=True
        )
        self.data = data
        self.n_bins = loaded.config.data.tokenizer.n_bins
        ids = loaded.vocab.lookup(data.genes)
        if (ids < 0).any():
            unknown = [g for g, i in zip(data.genes, ids, strict=True) if i < 0]
            raise ValueError(f"context genes unknown to the model's vocabulary: {unknown[:5]}")
        self.token_ids = torch.as_tensor(
            np.concatenate([[loaded.vocab.cls_id], ids]), dtype=torch.long
        )  # (L,) = <cls> + G
        cfg = self.model.cfg
        self.batch_index = min(max(batch_index, 0), max(cfg.n_batches - 1, 0))
        # Control cells' input bins, computed once (seeded per cell).
        self.ctrl_bins = np.stack(
            [
                bin_cell(row, self.n_bins, np.random.default_rng([seed, i]))
                for i, row in enumerate(data.ctrl)
            ]
        ).astype(np.float32)  # (n_control, G)

    def _inputs(self, ctrl_rows: np.ndarray, flags: np.ndarray) -> dict[str, torch.Tensor]:
        """Model inputs for control cells (row indices) with per-gene flags (B, G)."""
        b = len(ctrl_rows)
        values = np.concatenate(
            [np.full((b, 1), keys.PAD_VALUE, np.float32), self.ctrl_bins[ctrl_rows]], axis=1
        )  # (B, L)
        pert = np.concatenate([np.zeros((b, 1), np.int64), flags], axis=1)  # (B, L)
        genes = self.token_ids.expand(b, -1)  # (B, L)
        kw = {
            "genes": genes,
            "values": torch.from_numpy(values),
            "key_padding_mask": torch.zeros(genes.shape, dtype=torch.bool),
            "perturbation": torch.from_numpy(pert),
        }
        cfg = self.model.cfg
        if cfg.use_batch_labels or cfg.domain_spec_batchnorm == "dsbn" or cfg.do_dab:
            kw["batch"] = torch.full((b,), self.batch_index, dtype=torch.long)
        if cfg.use_modality:
            kw["modality"] = torch.full((b,), keys.MODALITY_RNA, dtype=torch.long)
        return kw

    def flags_for(self, name: str) -> np.ndarray:
        """(G,) perturbation flags of a perturbation name."""
        flags = np.zeros(len(self.data.genes), np.int64)
        flags[self.data.gene_index(targets_of(name))] = 1
        return flags

    @torch.no_grad()
    def calibrate_head(self, n_cells: int = 128, seed: int = 0) -> tuple[float, float]:
        """Fold `target ~ a * prediction + b` (least squares over control cells reconstructing themselves,
        flags 0) into the GEP head's last linear layer; returns (a, b).

        The pretrained head predicts bins (0..n_bins-1) while the target is log1p expression; without this,
        the first epochs at a finetuning learning rate go into moving the output scale."""
        self.model.eval()
        n_ctrl = len(self.data.ctrl)
        rows = np.random.default_rng(seed).choice(n_ctrl, min(n_cells, n_ctrl), replace=False)
        flags = np.zeros((len(rows), len(self.data.genes)), np.int64)
        pred = self.model(**self._inputs(rows, flags))["gep"][:, 1:].double().numpy().ravel()
        target = self.data.ctrl[rows].astype(np.float64).ravel()
        a, b = np.polyfit(pred, target, 1) if np.std(pred) > 1e-9 else (0.0, float(target.mean()))
        last = self.model.decoder.fc[-1]
        last.weight.mul_(float(a))
        last.bias.mul_(float(a)).add_(float(b))
        log.info("perturbation head calibrated: log1p ~ %.4f * prediction + %.4f", a, b)
        return float(a), float(b)

    def fit(self, train: list[str], cfg: PerturbationTrainConfig) -> list[float]:
        """Finetune on (control cell, perturbed cell) pairs of the `train` perturbations through the one
        finetuning loop (`train_epochs`); per-epoch mean squared errors."""
        gen = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.calibrate_head:
            self.calibrate_head(seed=cfg.seed)
        data = self.data
        targets = np.concatenate([data.cells[n] for n in train])  # (N, G)
        flags = np.concatenate(
            [np.repeat(self.flags_for(n)[None], len(data.cells[n]), 0) for n in train]
        )  # (N, G)
        n_ctrl_pairs = int(round(cfg.control_pairs * len(targets)))
        n_ctrl = len(data.ctrl)

        def batches(epoch: int):
            # Perturbed examples, then control -> control examples (targets are other control cells).
            ctrl_targets = gen.integers(0, n_ctrl, n_ctrl_pairs)
            all_targets = np.concatenate([targets, data.ctrl[ctrl_targets]])  # (N', G)
            all_flags = np.concatenate([flags, np.zeros((n_ctrl_pairs, flags.shape[1]), np.int64)])
            order = gen.permutation(len(all_targets))
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                if len(idx) >= 2:
                    ctrl_rows = gen.integers(0, n_ctrl, len(idx))
                    yield ctrl_rows, all_flags[idx], all_targets[idx]

        def loss_of(batch):
            ctrl_rows, batch_flags, batch_targets = batch
            pred = self.model(**self._inputs(ctrl_rows, batch_flags))["gep"][:, 1:]  # (B, G)
            return F.mse_loss(pred, torch.from_numpy(batch_targets)), {}

        history = train_epochs(self.model, cfg, batches, loss_of, name="perturbation finetune")
        cfg.losses.extend(h["loss"] for h in history)
        return cfg.losses

    @torch.no_grad()
    def predict_means(
        self, names: list[str], n_controls: int = 300, batch_size: int = 64, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Predicted mean log expression (G,) of each perturbation: the model's output averaged over the same
        `n_controls` control cells (all of them when there are fewer)."""
        self.model.eval()
        n_ctrl = len(self.data.ctrl)
        rng = np.random.default_rng(seed)
        rows = (
            np.arange(n_ctrl)
            if n_controls >= n_ctrl
            else rng.choice(n_ctrl, n_controls, replace=False)
        )
        out = {}
        for name in names:
            flags = self.flags_for(name)
            total = np.zeros(len(self.data.genes), np.float64)
            for start in range(0, len(rows), batch_size):
                r = rows[start : start + batch_size]
                pred = self.model(**self._inputs(r, np.repeat(flags[None], len(r), 0)))["gep"]
                total += pred[:, 1:].double().sum(0).numpy()  # (G,)
            out[name] = (total / len(rows)).astype(np.float32)
        return out


def pretrained_gene_embeddings(loaded: LoadedModel, genes: list[str]) -> np.ndarray:
    """The pretrained model's gene token embeddings (after its LayerNorm) of `genes`, (G, D)."""
    ids = torch.as_tensor(loaded.vocab.lookup(genes), dtype=torch.long)
    if bool((ids < 0).any()):
        raise ValueError(
            "genes unknown to the model's vocabulary; choose the context from its genes"
        )
    with torch.no_grad():
        emb = loaded.model.encoder(ids)  # (G, D)
    return emb.float().numpy().astype(np.float64)

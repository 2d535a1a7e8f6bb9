"""The GRN task's planted truth and its scores: a synthetic census's co-expression network
(`PlantedNetwork`, read from the ground-truth JSON it writes), edge metrics (AUPRC against the random
baseline, early precision), program recovery against planted modules, and the top-edges table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_ingest import keys
from data_ingest.synth.census import GROUND_TRUTH_SUFFIX

# Fields of the ground-truth JSON a synthetic census writes next to itself (`CensusTruth.to_json`).
TRUTH_EDGES = "coexpression_edges"
TRUTH_MODULES = "modules"
TRUTH_MODULE_GENES = "genes"
TRUTH_ACTIVE_IN = "active_in"


@dataclass
class PlantedNetwork:
    """Planted co-expression modules and edges of a synthetic census."""

    modules: list[list[str]]
    """Gene names of each module."""
    active_in: list[list[str]]
    """Cell types in which each module is active."""
    edges: set[tuple[str, str]]
    """Planted undirected edges (gene pairs within a module), each stored once as (a, b)."""

    @classmethod
    def from_json(cls, truth: dict) -> PlantedNetwork:
        if TRUTH_EDGES not in truth or TRUTH_MODULES not in truth:
            raise ValueError(
                f"ground truth lacks `{TRUTH_EDGES}` / `{TRUTH_MODULES}`; pass the "
                "<census>.ground_truth.json that `python -m data_ingest.synth` writes"
            )
        mods = truth[TRUTH_MODULES]
        return cls(
            modules=[list(m[TRUTH_MODULE_GENES]) for m in mods],
            active_in=[list(m.get(TRUTH_ACTIVE_IN, [])) for m in mods],
            edges={(str(a), str(b)) for a, b in truth[TRUTH_EDGES]},
        )

    @classmethod
    def load(cls, path: str | Path) -> PlantedNetwork:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no ground truth at {path}; pass --truth <census>.ground_truth.json"
            )
        return cls.from_json(json.loads(path.read_text()))

    def module_ids(self, cell_type: str | None = None) -> list[int]:
        """All modules, or those active in `cell_type`."""
        return [
            m for m, active in enumerate(self.active_in) if cell_type is None or cell_type in active
        ]

    def module_labels(self, genes: list[str], cell_type: str | None = None) -> np.ndarray:
        """Planted module of each gene (G,), -1 for genes in none (of the modules active in `cell_type`)."""
        pos = {g: i for i, g in enumerate(genes)}
        labels = np.full(len(genes), -1, np.int64)
        for m in self.module_ids(cell_type):
            for gene in self.modules[m]:
                if gene in pos:
                    labels[pos[gene]] = m
        return labels

    def edge_matrix(self, genes: list[str], cell_type: str | None = None) -> np.ndarray:
        """Boolean symmetric (G, G): planted edges among `genes` (of modules active in `cell_type`)."""
        pos = {g: i for i, g in enumerate(genes)}
        allowed = set(self.module_ids(cell_type))
        gene_module = {g: m for m, mod in enumerate(self.modules) for g in mod}
        out = np.zeros((len(genes), len(genes)), dtype=bool)
        for a, b in self.edges:
            if a in pos and b in pos and gene_module.get(a) in allowed:
                out[pos[a], pos[b]] = out[pos[b], pos[a]] = True
        return out


def find_truth(data: str | Path) -> Path:
    """The ground truth JSON next to a synthetic census (`<census>.ground_truth.json`), given the census
    collection or its `census_data/<organism>` experiment."""
    path = Path(data).resolve()
    candidates = [path]
    if path.parent.name == keys.CENSUS_DATA:
        candidates.append(path.parent.parent)
    for c in candidates:
        truth = Path(str(c) + GROUND_TRUTH_SUFFIX)
        if truth.is_file():
            return truth
    raise FileNotFoundError(
        f"no {GROUND_TRUTH_SUFFIX} next to {data}; pass --truth with the ground truth JSON of a synthetic "
        "census (`python -m data_ingest.synth` writes it)"
    )


@dataclass
class EdgeMetrics:
    """How well a score matrix ranks the planted edges among all gene pairs."""

    auprc: float
    """Average precision of the pair scores vs planted edges."""
    random_auprc: float
    """AUPRC of random scores = edge density (positives / pairs)."""
    early_precision: float
    """Precision among the k highest-scoring pairs, k = number of planted edges."""
    auroc: float
    n_edges: int
    n_pairs: int

    @property
    def auprc_ratio(self) -> float:
        return self.auprc / self.random_auprc if self.random_auprc > 0 else float("nan")

    @property
    def early_precision_ratio(self) -> float:
        return self.early_precision / self.random_auprc if self.random_auprc > 0 else float("nan")


def _pairs(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape != truth.shape or scores.shape[0] != scores.shape[1]:
        raise ValueError(
            f"scores {scores.shape} and truth {truth.shape} must be the same square matrix"
        )
    iu = np.triu_indices(scores.shape[0], 1)
    return scores[iu].astype(np.float64), truth[iu].astype(bool)


def evaluate_edges(scores: np.ndarray, truth: np.ndarray) -> EdgeMetrics:
    """Rank all unordered gene pairs (upper triangle) by `scores` against the boolean `truth` (G, G)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, y = _pairs(scores, truth)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(
            f"{n_pos} of {len(y)} gene pairs are planted edges; the gene set must hold some planted edges "
            "and some non-edges (lower --min-detection, or check the ground truth matches the data)"
        )
    if not np.isfinite(s).all():
        raise ValueError("edge scores contain NaN or infinite values")
    return EdgeMetrics(
        auprc=float(average_precision_score(y, s)),
        random_auprc=n_pos / len(y),
        early_precision=_precision_at(s, y, n_pos),
        auroc=float(roc_auc_score(y, s)),
        n_edges=n_pos,
        n_pairs=len(y),
    )


def _precision_at(s: np.ndarray, y: np.ndarray, k: int) -> float:
    """Precision among the k highest scores; pairs tied with the k-th score count with their group's share of
    true edges (the expectation over tie orders), so the gene order cannot help or hurt."""
    kth = np.partition(-s, k - 1)[k - 1]  # minus the k-th highest score
    above = -s < kth
    tied = -s == kth
    n_above = int(above.sum())
    return float((y[above].sum() + (k - n_above) * y[tied].mean()) / k)


def pr_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of the pair ranking, for plotting."""
    from sklearn.metrics import precision_recall_curve

    s, y = _pairs(scores, truth)
    precision, recall, _ = precision_recall_curve(y, s)
    return recall, precision


@dataclass
class ProgramMetrics:
    """How well gene programs (cluster labels) recover the planted modules."""

    ari: float
    """Adjusted Rand index between programs and planted modules, over the genes of planted modules."""
    best_match_jaccard: float
    """Mean over planted modules of the best Jaccard overlap with any program (programs include every
    gene of the set, so programs that swallow background genes score lower)."""
    n_programs: int
    n_modules: int


def program_recovery(programs: np.ndarray, modules: np.ndarray) -> ProgramMetrics:
    """programs: (G,) cluster label of every gene; modules: (G,) planted module or -1 (not in a module)."""
    from sklearn.metrics import adjusted_rand_score

    in_module = modules >= 0
    mods = np.unique(modules[in_module])
    if len(mods) == 0:
        raise ValueError("no gene of the set belongs to a planted module; nothing to recover")
    jaccards = []
    for m in mods:
        members = modules == m
        best = 0.0
        for p in np.unique(programs[members]):
            prog = programs == p
            best = max(best, (members & prog).sum() / (members | prog).sum())
        jaccards.append(best)
    return ProgramMetrics(
        ari=float(adjusted_rand_score(modules[in_module], programs[in_module])),
        best_match_jaccard=float(np.mean(jaccards)),
        n_programs=len(np.unique(programs)),
        n_modules=len(mods),
    )


def top_edges(
    scores: np.ndarray,
    genes: list[str],
    k: int,
    truth: np.ndarray | None = None,
    modules: np.ndarray | None = None,
) -> list[dict]:
    """The k highest-scoring gene pairs: gene_a, gene_b, score, and whether each is a planted edge."""
    iu = np.triu_indices(len(genes), 1)
    s = scores[iu]
    order = np.argsort(-s, kind="stable")[:k]
    rows = []
    for rank, o in enumerate(order, 1):
        i, j = int(iu[0][o]), int(iu[1][o])
        row = {"rank": rank, "gene_a": genes[i], "gene_b": genes[j], "score": float(s[o])}
        if truth is not None:
            row["planted"] = "yes" if truth[i, j] else "no"
        if modules is not None:
            row["module_a"] = int(modules[i])
            row["module_b"] = int(modules[j])
        rows.append(row)
    return rows

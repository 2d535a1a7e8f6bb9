"""Synthetic perturbation screens (Perturb-seq-like) drawn from the synthetic census's generative model.

Control cells are cells of one cell type in one dataset of a synthetic census (`data_ingest.synth`, same
`CensusTruth`: same gene names, baseline expression, dataset effect, marker program and co-expression modules
for the same census config and seed). Perturbed cells are drawn from the same model with planted effects:

- **knock-down** of each target gene: its rate is multiplied by `knockdown` (the perturbed gene stays in the
  data, mostly at zero);
- **module effect**: a target in a co-expression module active in the cell type lowers that module's
  activity (`module_factor` per target in the module), so the module's other genes drop with it;
- **program effect**: a target that is one of the cell type's marker genes weakens the whole marker program
  (its log fold change times `program_factor`);
- a **generic response** shared by every perturbation (`n_generic_genes` genes up by `generic_lfc`, once,
  also for doubles: it saturates) and a few **private** genes per target with random log fold changes;
- **doubles** combine both targets' mechanisms (two knock-downs, both module / program effects: partly
  non-additive already) and a planted interaction: `additive` (none), `synergy` / `buffering` (the
  combined log fold change of every non-target gene scaled by `synergy_scale` / `buffering_scale`) or
  `neomorphic` (extra genes that neither single touches).

Counts are Poisson with the per-cell rate (library size x proportions + module reads with a per-cell module
activity), which is the distribution `synth._sample_block` draws by sampling reads. Cells are generated in
blocks of at most `block_cells` dense rows and kept as CSR.

obs: `perturbation` ("ctrl", "GENE+ctrl", "GENE_A+GENE_B", GEARS style), `condition` ("ctrl" / "single" /
"double"), `cell_type`, `dataset_id`, `n_counts`. uns: `perturbation_truth` (JSON: configs, targets and
mechanisms of every perturbation), `expected_lfc` (perturbations x genes: log ratio of the expected perturbed
vs control rate at mean library size and module activity), `expected_lfc_perturbations` (its row names).

    python -m data_ingest.synth.perturb --out outputs/perturb/perturb.h5ad \\
        --census-truth outputs/synth/census.ground_truth.json

No registry package installed here ships a real perturbation data set: `cell-gears` and `pertpy` exist on
PyPI but download their data (Norman 2019, etc.) at run time, which this machine cannot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_ingest import keys
from data_ingest.synth.census import CensusSynthConfig, CensusTruth

INTERACTIONS = ("additive", "synergy", "buffering", "neomorphic")


@dataclass
class PerturbSynthConfig:
    """Which cells are perturbed, which perturbations, and how strong the planted effects are."""

    dataset: int = -1
    """Census dataset index whose cells are perturbed (-1 = the largest primary dataset)."""
    cell_type: str = ""
    """Census cell type name (e.g. `celltype_003`); empty = the chosen dataset's most common type."""
    n_control_cells: int = 800
    """Unperturbed (control) cells."""
    cells_per_perturbation: int = 80
    """Cells drawn for each single and each double perturbation."""
    n_single: int = 24
    """Single-gene perturbations (half module genes, a quarter markers, a quarter other expressed genes)."""
    n_double: int = 16
    """Double perturbations, each a pair of the single targets."""
    knockdown: float = 0.1
    """Fraction of a target gene's expression left after its knock-down."""
    module_factor: float = 0.2
    """Activity of an active co-expression module is multiplied by this per target gene in it."""
    program_factor: float = 0.3
    """The marker program's log fold change is multiplied by this per marker-gene target."""
    n_generic_genes: int = 20
    """Genes of the response shared by every perturbation."""
    generic_lfc: float = 0.5
    """Log fold change of the shared response (applied once, also for doubles)."""
    n_private_genes: int = 5
    """Genes with a target-specific random effect, per target."""
    private_lfc_sd: float = 0.6
    """SD of the target-specific log fold changes."""
    interaction_probs: list[float] = field(default_factory=lambda: [0.3, 0.25, 0.25, 0.2])
    """Probabilities of a double's interaction: additive, synergy, buffering, neomorphic."""
    synergy_scale: float = 1.8
    """Synergy: a double's non-target log fold changes are multiplied by this."""
    buffering_scale: float = 0.4
    """Buffering: a double's non-target log fold changes are multiplied by this."""
    n_neomorphic_genes: int = 8
    """Neomorphic: genes that only the double changes."""
    neomorphic_lfc: float = 1.0
    """Neomorphic: size of those genes' log fold changes (random sign)."""
    block_cells: int = 2048
    """Most cells generated as one dense block (bounds memory at about block_cells x genes x 8 bytes x 4)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.knockdown <= 1.0:
            raise ValueError(f"knockdown={self.knockdown}; use a fraction in (0, 1]")
        if (
            len(self.interaction_probs) != len(INTERACTIONS)
            or abs(sum(self.interaction_probs) - 1.0) > 1e-6
        ):
            raise ValueError(
                f"interaction_probs={self.interaction_probs}; give {len(INTERACTIONS)} probabilities "
                f"({', '.join(INTERACTIONS)}) that sum to 1"
            )
        if self.n_double > self.n_single * (self.n_single - 1) // 2:
            raise ValueError(
                f"n_double={self.n_double} is more than the {self.n_single} singles can pair into"
            )
        if self.n_control_cells < 2 or self.cells_per_perturbation < 2:
            raise ValueError("n_control_cells and cells_per_perturbation need at least 2 cells")


@dataclass
class Perturbation:
    """One planted perturbation (single or double) and its mechanism."""

    name: str
    """GEARS-style name: `A+ctrl` or `A+B`."""
    targets: list[int]
    """Target gene indices."""
    private: dict[int, float]
    """Gene index -> target-specific log fold change (summed over targets)."""
    interaction: str = "additive"
    interaction_scale: float = 1.0
    """Multiplier of the non-target log fold changes (synergy / buffering)."""
    neomorphic: dict[int, float] = field(default_factory=dict)
    """Gene index -> log fold change that only this double has."""


def perturbation_name(genes: list[str]) -> str:
    """GEARS-style condition name: `A+ctrl` for a single, `A+B` for a double."""
    return keys.PERT_SEPARATOR.join(list(genes) + [keys.CONTROL_CONDITION] * (2 - len(genes)))


def perturbation_genes(name: str) -> list[str]:
    """Target genes of a GEARS-style name (`ctrl` -> [])."""
    return [g for g in name.split(keys.PERT_SEPARATOR) if g != keys.CONTROL_CONDITION]


class PerturbationScreen:
    """The planted screen: chosen cells, targets, mechanisms, and a sampler of counts."""

    def __init__(self, truth: CensusTruth, cfg: PerturbSynthConfig):
        self.truth, self.cfg = truth, cfg
        census = truth.cfg
        if cfg.dataset >= census.n_datasets:
            raise ValueError(
                f"dataset={cfg.dataset}; the census has {census.n_datasets} datasets (0..{census.n_datasets - 1})"
            )
        if cfg.dataset < 0:
            primary = [i for i, d in enumerate(truth.datasets) if d["is_primary_data"]]
            self.dataset = max(
                primary or range(len(truth.datasets)), key=lambda i: truth.datasets[i]["n_cells"]
            )
        else:
            self.dataset = cfg.dataset
        info = truth.datasets[self.dataset]
        if cfg.cell_type:
            if cfg.cell_type not in truth.type_names:
                raise ValueError(
                    f"cell_type={cfg.cell_type!r} is not a census cell type (e.g. {truth.type_names[:3]})"
                )
            self.cell_type = truth.type_names.index(cfg.cell_type)
        else:
            self.cell_type = int(info["cell_types"][int(np.argmax(info["type_mix"]))])
        rng = np.random.default_rng([cfg.seed, 6])
        t = self.cell_type
        g = census.n_genes
        expressed = np.argsort(truth.log_base)[g // 2 :]
        active = truth.type_modules[t]
        module_genes = np.unique(truth.modules[active].ravel())
        markers = np.sort(truth.markers[t])
        other = np.setdiff1d(expressed, np.concatenate([truth.modules.ravel(), markers]))
        n_mod = min(len(module_genes), int(round(cfg.n_single * 0.5)))
        n_mark = min(len(markers), int(round(cfg.n_single * 0.25)))
        n_other = cfg.n_single - n_mod - n_mark
        if n_other > len(other):
            raise ValueError(
                f"n_single={cfg.n_single} is more targets than the census has genes for"
            )
        targets = np.concatenate(
            [
                rng.choice(module_genes, n_mod, replace=False),
                rng.choice(markers, n_mark, replace=False),
                rng.choice(other, n_other, replace=False),
            ]
        ).astype(int)
        self.single_targets = [int(x) for x in targets]
        candidates = np.setdiff1d(expressed, targets)
        self.generic_genes = np.sort(rng.choice(candidates, cfg.n_generic_genes, replace=False))
        private = {
            int(x): {
                int(gene): float(rng.normal(0.0, cfg.private_lfc_sd))
                for gene in rng.choice(candidates, cfg.n_private_genes, replace=False)
            }
            for x in targets
        }
        names = truth.gene_names
        self.perturbations: list[Perturbation] = [
            Perturbation(perturbation_name([names[x]]), [x], dict(private[x]))
            for x in self.single_targets
        ]
        pairs: set[tuple[int, int]] = set()
        while len(pairs) < cfg.n_double:
            a, b = sorted(rng.choice(len(targets), 2, replace=False).tolist())
            pairs.add((a, b))
        for a, b in sorted(pairs):
            x, y = self.single_targets[a], self.single_targets[b]
            merged = dict(private[x])
            for gene, lfc in private[y].items():
                merged[gene] = merged.get(gene, 0.0) + lfc
            kind = INTERACTIONS[int(rng.choice(len(INTERACTIONS), p=cfg.interaction_probs))]
            scale = {"synergy": cfg.synergy_scale, "buffering": cfg.buffering_scale}.get(kind, 1.0)
            neo = {}
            if kind == "neomorphic":
                genes = rng.choice(
                    np.setdiff1d(candidates, list(merged)), cfg.n_neomorphic_genes, replace=False
                )
                signs = rng.choice([-1.0, 1.0], len(genes))
                neo = {
                    int(gg): float(s * cfg.neomorphic_lfc)
                    for gg, s in zip(genes, signs, strict=True)
                }
            self.perturbations.append(
                Perturbation(
                    perturbation_name([names[x], names[y]]), [x, y], merged, kind, scale, neo
                )
            )

    # -------------------------------------------------------------------------------------------- rates

    def rates(
        self, pert: Perturbation | None, lib: np.ndarray, act: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Expected counts (control, perturbed) of cells with library sizes `lib` (n,) and module activities
        `act` (n, modules_per_type): both (n, genes). `pert=None` returns the control rate twice."""
        truth, cfg = self.truth, self.cfg
        census = truth.cfg
        t, d = self.cell_type, self.dataset
        targets = pert.targets if pert is not None else []
        n_marker_targets = sum(x in set(truth.markers[t].tolist()) for x in targets)

        logits = truth.log_base + truth.batch_scale[d].astype(np.float64)  # (G,)
        logits = logits.copy()
        logits[truth.markers[t]] += np.log(census.marker_fold)
        p = np.exp(logits - logits.max())
        p /= p.sum()  # (G,) control proportions, as the census draws them

        def mechanism(program_mult: float, module_mult: np.ndarray) -> np.ndarray:
            rate = lib[:, None] * p[None, :]  # (n, G)
            # A weaker marker program scales the markers' fold change, without renormalizing the rest.
            rate[:, truth.markers[t]] *= census.marker_fold ** (program_mult - 1.0)
            for j, k in enumerate(truth.type_modules[t]):
                reads = lib * census.module_fraction * act[:, j] / census.modules_per_type  # (n,)
                rate[:, truth.modules[k]] += (reads * module_mult[j])[
                    :, None
                ] * truth.module_weights[k][None, :]  # (n, genes_per_module)
            return rate

        ones = np.ones(census.modules_per_type)
        ctrl = mechanism(1.0, ones)
        if pert is None:
            return ctrl, ctrl
        module_mult = np.array(
            [
                cfg.module_factor ** sum(x in set(truth.modules[k].tolist()) for x in targets)
                for k in truth.type_modules[t]
            ]
        )
        rate = mechanism(cfg.program_factor**n_marker_targets, module_mult)
        lfc = np.zeros(census.n_genes)
        lfc[self.generic_genes] += cfg.generic_lfc
        for gene, value in pert.private.items():
            lfc[gene] += value
        rate *= np.exp(lfc)[None, :]
        if pert.interaction_scale != 1.0:
            rest = np.setdiff1d(np.arange(census.n_genes), targets)
            rate[:, rest] = ctrl[:, rest] * np.exp(
                pert.interaction_scale * np.log(rate[:, rest] / ctrl[:, rest])
            )
        for gene, value in pert.neomorphic.items():
            rate[:, gene] *= np.exp(value)
        rate[:, targets] *= cfg.knockdown
        return ctrl, rate

    def expected_lfc(self, pert: Perturbation) -> np.ndarray:
        """log(expected perturbed rate / expected control rate) per gene at mean library and activity, (G,)."""
        ctrl, rate = self.rates(pert, np.ones(1), np.ones((1, self.truth.cfg.modules_per_type)))
        return np.log(rate[0] / ctrl[0])

    def sample(self, pert: Perturbation | None, n: int, rng: np.random.Generator) -> sp.csr_matrix:
        """Counts of `n` cells (CSR, float32) under `pert` (None = control), in blocks of `block_cells`."""
        census, info = self.truth.cfg, self.truth.datasets[self.dataset]
        # Per-cell draws first, then the counts block by block: the same cells whatever block_cells is.
        lib = rng.lognormal(np.log(census.mean_library_size), 0.5, n) * info["library_scale"]
        act = rng.gamma(2.0, 0.5, (n, census.modules_per_type))  # module activity, mean 1
        blocks = []
        for start in range(0, n, self.cfg.block_cells):
            sl = slice(start, start + self.cfg.block_cells)
            _, rate = self.rates(pert, lib[sl], act[sl])
            blocks.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
            del rate
        return sp.vstack(blocks, format="csr")

    def to_json(self) -> dict:
        names = self.truth.gene_names
        t = self.cell_type

        def genes(idx) -> list[str]:
            return [names[int(i)] for i in idx]

        marker_set = set(self.truth.markers[t].tolist())
        return {
            "config": dataclasses.asdict(self.cfg),
            "census_config": dataclasses.asdict(self.truth.cfg),
            "dataset_id": self.truth.datasets[self.dataset]["dataset_id"],
            "cell_type": self.truth.type_names[t],
            "active_modules": [genes(self.truth.modules[k]) for k in self.truth.type_modules[t]],
            "marker_program": genes(np.sort(self.truth.markers[t])),
            "generic_genes": genes(self.generic_genes),
            "perturbations": [
                {
                    "name": p.name,
                    "targets": genes(p.targets),
                    "target_roles": [
                        "module"
                        if any(x in self.truth.modules[k] for k in self.truth.type_modules[t])
                        else ("marker" if x in marker_set else "other")
                        for x in p.targets
                    ],
                    "private": {names[g]: round(v, 6) for g, v in p.private.items()},
                    "interaction": p.interaction,
                    "interaction_scale": p.interaction_scale,
                    "neomorphic": {names[g]: round(v, 6) for g, v in p.neomorphic.items()},
                }
                for p in self.perturbations
            ],
        }


def make_perturbation_data(truth: CensusTruth, cfg: PerturbSynthConfig) -> ad.AnnData:
    """Counts AnnData of the control and perturbed cells, with the planted truth in `uns`."""
    screen = PerturbationScreen(truth, cfg)
    parts, labels = [], []
    rng = np.random.default_rng([cfg.seed, 7, 0])
    parts.append(screen.sample(None, cfg.n_control_cells, rng))
    labels += [keys.CONTROL_CONDITION] * cfg.n_control_cells
    for i, pert in enumerate(screen.perturbations, start=1):
        rng = np.random.default_rng(
            [cfg.seed, 7, i]
        )  # each perturbation's cells independent of the others
        parts.append(screen.sample(pert, cfg.cells_per_perturbation, rng))
        labels += [pert.name] * cfg.cells_per_perturbation
    X = sp.vstack(parts, format="csr")
    X.sort_indices()
    labels_arr = np.asarray(labels)
    n_targets = np.array([len(perturbation_genes(x)) for x in labels_arr])
    info = truth.datasets[screen.dataset]
    obs = pd.DataFrame(
        {
            keys.OBS_PERTURBATION: labels_arr,
            keys.OBS_CONDITION: np.select(
                [n_targets == 0, n_targets == 1], [keys.CONTROL_CONDITION, "single"], "double"
            ),
            keys.OBS_CELL_TYPE: truth.type_names[screen.cell_type],
            keys.OBS_DATASET: info["dataset_id"],
            "n_counts": np.asarray(X.sum(1)).ravel(),
        },
        index=[f"pert_{i}" for i in range(X.shape[0])],
    )
    var = pd.DataFrame(
        {keys.VAR_GENE_NAME: truth.gene_names, keys.VAR_GENE_ID: truth.gene_ids},
        index=truth.gene_names,
    )
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns[keys.UNS_PERTURBATION_TRUTH] = json.dumps(screen.to_json())
    adata.uns[keys.UNS_EXPECTED_LFC] = np.stack(
        [screen.expected_lfc(p) for p in screen.perturbations]
    ).astype(np.float32)
    adata.uns[keys.UNS_EXPECTED_LFC_INDEX] = [p.name for p in screen.perturbations]
    return adata


def census_config_from_truth(path: str | Path) -> CensusSynthConfig:
    """The census config recorded in a synthetic census's `<census>.ground_truth.json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such ground-truth file; pass the `<census>.ground_truth.json` that "
            "`python -m data_ingest.synth` wrote next to the census"
        )
    return CensusSynthConfig(**json.loads(path.read_text())["config"])


def write_h5ad_atomic(adata: ad.AnnData, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    d = PerturbSynthConfig()
    c = CensusSynthConfig()
    p = argparse.ArgumentParser(
        prog="python -m data_ingest.synth.perturb",
        description="Write a synthetic perturbation screen (.h5ad) drawn from a synthetic census's model.",
    )
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument(
        "--census-truth",
        help="a synthetic census's ground_truth.json: take the census config from it (else the flags below)",
    )
    p.add_argument("--cells", type=int, default=c.n_cells, help="census cells (sets dataset sizes)")
    p.add_argument("--genes", type=int, default=c.n_genes)
    p.add_argument("--datasets", type=int, default=c.n_datasets)
    p.add_argument("--tissues", type=int, default=c.n_tissues)
    p.add_argument("--cell-types", type=int, default=c.n_cell_types)
    p.add_argument("--census-seed", type=int, default=c.seed)
    p.add_argument("--dataset", type=int, default=d.dataset)
    p.add_argument("--cell-type", default=d.cell_type)
    p.add_argument("--control-cells", type=int, default=d.n_control_cells)
    p.add_argument("--cells-per-perturbation", type=int, default=d.cells_per_perturbation)
    p.add_argument("--singles", type=int, default=d.n_single)
    p.add_argument("--doubles", type=int, default=d.n_double)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if Path(a.out).exists() and not a.overwrite:
        raise FileExistsError(f"{a.out} exists; pass --overwrite or another --out")
    if a.census_truth:
        census = census_config_from_truth(a.census_truth)
    else:
        census = CensusSynthConfig(
            n_cells=a.cells,
            n_genes=a.genes,
            n_datasets=a.datasets,
            n_tissues=a.tissues,
            n_cell_types=a.cell_types,
            seed=a.census_seed,
        )
    cfg = PerturbSynthConfig(
        dataset=a.dataset,
        cell_type=a.cell_type,
        n_control_cells=a.control_cells,
        cells_per_perturbation=a.cells_per_perturbation,
        n_single=a.singles,
        n_double=a.doubles,
        seed=a.seed,
    )
    adata = make_perturbation_data(CensusTruth(census), cfg)
    write_h5ad_atomic(adata, a.out)
    truth = json.loads(adata.uns[keys.UNS_PERTURBATION_TRUTH])
    print(
        f"wrote {adata.n_obs} cells x {adata.n_vars} genes ({cfg.n_control_cells} control, {cfg.n_single} "
        f"singles, {cfg.n_double} doubles; {truth['cell_type']} of {truth['dataset_id']}) to {a.out}"
    )
    return 0


if __name__ == "__main__":
    from data_ingest.cli import run_main

    run_main(main)

"""Scheduled re-pretraining: follow the data, continue from the promoted model, gate, promote.

    python -m jobs.repretrain --config jobs/configs/repretrain.yaml [key.sub=value ...]
    python -m jobs.repretrain --config ... --rollback "reason"   # alias back to the previous version, hold
    python -m jobs.repretrain --config ... --release             # lift the hold

One run:
1. **What is new.** `repretrain.data_versions=ingest_log`: the local experiment's ingest log
   (`data_ingest.ingest`); `census`: the newest CELLxGENE Census release (LTS by default), pinned into
   `data.source.census_version`. Compared with the `data_version` tag of `mlflow.registered_model@alias`;
   equal -> prints "up to date" and exits 0.
2. **Warm start.** The promoted model's vocabulary is extended with the new genes (ids unchanged), its weights
   grown to match (scgpt_dist.train.warmstart: new gene rows = mean of the old ones + small noise), and pretraining
   continues (`train.max_steps` steps, `train.init_from`) on every training cell of the new datasets plus a
   `data.replay.fraction` sample of the old ones. With no promoted model yet, it pretrains from scratch on
   everything (the first version).
3. **Gate.** Candidate and promoted model on the same fixed held-out cells: GEP loss on old and on new data,
   zero-shot kNN cell-type accuracy (`repretrain.gate`). The first version has nothing to compare with; its
   gate only requires finite losses.
4. **Promote** (registry alias, compare-and-set) only if the gate passes.

Every step is recorded in `<output_dir>/runs/<target>__from-<base>/repretrain_state.json` (written
atomically), so an interrupted run continues where it stopped: training resumes from its newest checkpoint,
evaluation results are reused, a registered version is found again by its run id, and the alias is moved at
most once.

Exit codes: 0 promoted, up to date, or on hold; 1 failure or interrupted training (run again: it resumes);
2 user error (config, data, registry state); 3 gate failed, the promoted model is kept; 4 the alias moved
during the run (another run or an operator), nothing promoted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_ingest import keys
from data_ingest.atomic import write_text_atomic
from data_ingest.datasource import read_token_table
from data_ingest.demo_data import build_demo_experiment
from data_ingest.source import ALL, HOLDOUT, SomaCellSource, open_experiment
from data_ingest.vocab import GeneVocab
from jobs._cli import quiet_ray_data, run_main, setup_logging
from scgpt_dist.config import load_config
from scgpt_dist.evaluate import gep_baselines, knn_accuracy, model_scores, with_fixed_masks
from scgpt_dist.inference import embed_table
from scgpt_dist.model.transformer import build_model
from scgpt_dist.train import registry
from scgpt_dist.train.checkpoint import LoadedModel, load_consolidated
from scgpt_dist.train.driver import run_pretraining
from scgpt_dist.train.tracking import tracking_uri
from scgpt_dist.train.warmstart import extended_vocab, warm_start_state, write_model_dir

log = logging.getLogger("jobs.repretrain")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 3
EXIT_CONFLICT = 4

STATE_FILE = "repretrain_state.json"
RUNS_DIR = "runs"
PROMOTED_DIR = "promoted"
INIT_DIR = "init"
TRAIN_DIR = "train"

# Steps, in order; the state file holds the last one completed.
PLANNED = "planned"
TRAINED = "trained"
EVALUATED = "evaluated"
REJECTED = "rejected"
REGISTERED = "registered"
PROMOTED = "promoted"


@dataclass
class RunState:
    """One re-pretraining attempt: from a base version to a data version."""

    step: str
    target: dict
    """The DataVersion trained on (registry.DataVersion as a dict)."""
    base_version: str | None
    """The promoted version this run started from (None: the first version)."""
    new_datasets: list[str] | None
    run_id: str | None = None
    model_dir: str | None = None
    metrics: dict | None = None
    gate: dict | None = None
    candidate_version: str | None = None
    history: list[list[str]] = field(default_factory=list)
    """(step, UTC time) of every step completed, including repeats after a restart."""

    @classmethod
    def load(cls, path: Path) -> RunState | None:
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def advance(self, step: str, path: Path) -> None:

        self.step = step
        self.history.append([step, dt.datetime.now(dt.UTC).isoformat(timespec="seconds")])
        write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=1))
        log.info("repretrain step %s (state: %s)", step, path)


@dataclass
class Outcome:
    code: int
    message: str
    state: RunState | None = None
    run_dir: Path | None = None


# ------------------------------------------------------------------------------------------ what is new


def current_data(cfg):
    """(DataVersion now, function promoted-tags -> new dataset ids)."""
    if cfg.repretrain.data_versions == registry.CENSUS:
        directory = registry.census_directory(cfg.repretrain.census_lts_only)
        newest = registry.newest_census_version(directory, cfg.repretrain.census_lts_only)
        target = registry.census_data_version(newest)

        def new_since(tags: dict) -> list[str]:
            old = tags.get(registry.TAG_CENSUS_VERSION)
            if not old:
                raise ValueError(
                    f"the promoted model has no {registry.TAG_CENSUS_VERSION!r} tag; promote a version "
                    "registered by jobs.repretrain on the census"
                )
            return sorted(registry.census_datasets(newest) - registry.census_datasets(old))

        return target, new_since
    uri = cfg.data.source.soma_uri
    if cfg.data.build_demo and not Path(uri).exists():
        build_demo_experiment(uri, synth_cells=cfg.data.demo_synth_cells)
    if not Path(uri).exists() and "://" not in uri:
        raise ValueError(f"no SOMA experiment at {uri}; set data.source.soma_uri")
    return registry.local_data_version(uri), lambda tags: registry.new_ingested_datasets(uri, tags)


def _is_newer(target, promoted_tags: dict) -> bool:

    recorded = promoted_tags.get(registry.TAG_DATA_VERSION)
    if recorded == target.version:
        return False
    if target.kind == registry.CENSUS and promoted_tags.get(registry.TAG_CENSUS_VERSION):
        return (
            target.version > promoted_tags[registry.TAG_CENSUS_VERSION]
        )  # ISO dates sort as strings
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# ----------------------------------------------------------------------------------- candidate and gate


def candidate_config(cfg, run_dir: Path, promoted, target, new_datasets, n_batches: int):
    """The pretraining config of the candidate: the job's data and training settings; with a promoted
    model, its model and tokenizer settings, warm start and replay."""
    c = copy.deepcopy(cfg)
    c.name = f"{cfg.name}-{target.version}"
    c.output_dir = str(run_dir / TRAIN_DIR)
    c.mlflow.registered_model = None  # the job registers, after the gate
    c.data.build_demo = False
    if target.census_version:
        c.data.source.census_version = target.census_version
    if "://" not in c.data.source.soma_uri:
        c.data.source.soma_uri = str(Path(c.data.source.soma_uri).resolve())
    if promoted is not None:
        c.model = copy.deepcopy(promoted.config.model)
        c.model.n_batches = n_batches if promoted.config.model.n_batches else 0
        c.data.tokenizer = copy.deepcopy(promoted.config.data.tokenizer)
        c.data.vocab_path = str(run_dir / INIT_DIR / "vocab.json")
        c.train.init_from = str(run_dir / INIT_DIR)
        c.data.replay.new_datasets = list(new_datasets)
    return c


def prepare_warm_start(cfg, cand, promoted, run_dir: Path, batch_categories: list[str]) -> dict:
    """Write `run_dir/init`: the promoted model grown to the new vocabulary and batches (atomic; reused)."""
    init = run_dir / INIT_DIR
    if (init / keys.META_FILE).is_file():
        return json.loads((init / keys.META_FILE).read_text())["warm_start"]
    vocab, added = extended_vocab(promoted.vocab, SomaCellSource(cand.data.source).gene_names())
    state, report = warm_start_state(
        promoted,
        vocab,
        cand.model,
        batch_categories,
        noise=cfg.repretrain.new_gene_noise,
        seed=cfg.train.seed,
    )
    info = {
        "vocab_size": len(vocab),
        "promoted_vocab_size": len(promoted.vocab),
        "new_genes": len(added),
        "new_batches": report.new_batches,
        "fresh_tensors": report.fresh,
        "new_gene_noise": cfg.repretrain.new_gene_noise,
    }
    meta = {"warm_start": info, "data": {"batch_categories": batch_categories}}
    write_model_dir(init, state, cand, vocab, meta)
    log.info(
        "warm start: vocabulary %d -> %d genes (%d new), %d new batches",
        len(promoted.vocab),
        len(vocab),
        len(added),
        len(report.new_batches),
    )
    return info


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
    import numpy as np
    import pyarrow as pa

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


def _flat(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                out[f"gate.{k}.{kk}"] = float(vv)
    return out


# ----------------------------------------------------------------------------------------------- the job


def repretrain(cfg) -> Outcome:
    """One scheduled run (see the module docstring); returns the exit code and what happened."""
    from mlflow.tracking import MlflowClient

    name, alias = cfg.mlflow.registered_model, cfg.repretrain.alias
    if not name:
        raise ValueError(
            "jobs.repretrain needs mlflow.registered_model: the registered model it follows"
        )
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.mlflow.tracking_uri, out)
    client = MlflowClient(uri)

    hold = registry.hold_reason(client, name)
    if hold:
        return Outcome(EXIT_OK, f"on hold, nothing done: {hold} (lift with --release)")
    champion = registry.promoted_version(client, name, alias)
    target, new_since = current_data(cfg)
    if champion is not None and not _is_newer(target, champion.tags):
        return Outcome(
            EXIT_OK,
            f"up to date: {name}@{alias} is version {champion.version}, trained on data version "
            f"{champion.tags.get(registry.TAG_DATA_VERSION)}",
        )
    base = None if champion is None else str(champion.version)
    run_dir = out / RUNS_DIR / _slug(f"{target.version}__from-{base or 'scratch'}")
    state_path = run_dir / STATE_FILE
    state = RunState.load(state_path)
    if state is None:
        new = None if champion is None else new_since(champion.tags)
        state = RunState(PLANNED, dataclasses.asdict(target), base, new)
        state.advance(PLANNED, state_path)
        log.info(
            "new data: %s -> %s (%s)",
            None if champion is None else champion.tags.get(registry.TAG_DATA_VERSION),
            target.version,
            "first version" if new is None else f"new datasets: {', '.join(new) or 'none'}",
        )
    else:
        log.info("resuming %s at step %s", run_dir, state.step)

    # Training and evaluation need the promoted model and the data's batch categories; later steps do not.
    promoted = None
    batch_categories: list[str] = []
    if champion is not None and state.step in (PLANNED, TRAINED):
        promoted = load_consolidated(registry.download_model(champion, run_dir / PROMOTED_DIR, uri))
        source_cfg = copy.deepcopy(cfg.data.source)
        if target.census_version:
            source_cfg.census_version = target.census_version
        batch_categories = SomaCellSource(source_cfg).resolve(promoted.vocab, ALL).batch_categories
    cand = candidate_config(
        cfg, run_dir, promoted, target, state.new_datasets or [], len(batch_categories)
    )

    if state.step == PLANNED:
        if promoted is not None:
            prepare_warm_start(cfg, cand, promoted, run_dir, batch_categories)
        summary = run_pretraining(cand)
        if "model_dir" not in summary:
            return Outcome(
                EXIT_FAILED,
                f"training stopped at step {summary['step']} of {cand.train.max_steps}; run again to "
                "resume from its checkpoint",
                state,
                run_dir,
            )
        state.run_id, state.model_dir = summary["run_id"], summary["model_dir"]
        state.advance(TRAINED, state_path)

    if state.step == TRAINED:
        state.metrics = evaluate_gate(
            cand, state.model_dir, promoted, state.new_datasets, cfg.repretrain.gate
        )
        client.log_batch(
            state.run_id,
            metrics=[_metric(k, v) for k, v in _flat(state.metrics).items() if math.isfinite(v)],
        )
        state.advance(EVALUATED, state_path)

    if state.step in (EVALUATED, REJECTED):
        passed, reasons = decide(state.metrics, cfg.repretrain.gate, base is not None)
        state.gate = {
            "passed": passed,
            "reasons": reasons,
            "thresholds": dataclasses.asdict(cfg.repretrain.gate),
        }
        client.set_tag(state.run_id, "gate.passed", str(passed))
        client.set_tag(state.run_id, "gate.reasons", "\n".join(reasons)[:5000])
        if not passed:
            state.advance(REJECTED, state_path)
            kept = (
                f"{name}@{alias} stays at version {base}"
                if base
                else f"{name} has no {alias!r} yet"
            )
            return Outcome(
                EXIT_GATE_FAILED,
                f"not promoted: the gate failed; {kept}.\n  " + "\n  ".join(reasons),
                state,
                run_dir,
            )

    if state.step in (EVALUATED, REJECTED):
        vocab = GeneVocab.load(Path(state.model_dir) / keys.VOCAB_FILE)
        tags = {
            **target.tags(),
            registry.TAG_SOMA_URI: cand.data.source.soma_uri,
            registry.TAG_VOCAB_SIZE: str(len(vocab)),
            registry.TAG_VOCAB_FINGERPRINT: vocab.fingerprint(),
            registry.TAG_WARM_STARTED_FROM: base or "",
            registry.TAG_RUN_DIR: str(run_dir),
            registry.TAG_GATE: json.dumps(state.gate)[:5000],
        }
        version = registry.register_candidate(client, name, state.run_id, tags)
        state.candidate_version = str(version.version)
        state.advance(REGISTERED, state_path)

    if state.step == REGISTERED:
        try:
            registry.promote(client, name, alias, state.candidate_version, expected=base)
        except registry.PromotionConflict as err:
            return Outcome(EXIT_CONFLICT, str(err), state, run_dir)
        state.advance(PROMOTED, state_path)

    return Outcome(
        EXIT_OK,
        f"promoted: {name}@{alias} -> version {state.candidate_version} (data version {target.version}, "
        f"from version {base or 'none'})",
        state,
        run_dir,
    )


def _metric(key: str, value: float):
    import time

    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.repretrain", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help="experiment YAML (see jobs/configs/repretrain*.yaml)")
    parser.add_argument(
        "--rollback",
        metavar="REASON",
        help="point the alias back at the previous version and hold re-pretraining",
    )
    parser.add_argument("--release", action="store_true", help="lift a hold set by --rollback")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    setup_logging()

    cfg = load_config(args.config, args.overrides)
    quiet_ray_data()
    if args.rollback or args.release:
        from mlflow.tracking import MlflowClient

        name = cfg.mlflow.registered_model
        if not name:
            raise ValueError("set mlflow.registered_model: the registered model to roll back")
        client = MlflowClient(tracking_uri(cfg.mlflow.tracking_uri, Path(cfg.output_dir).resolve()))
        if args.rollback:
            old, new = registry.rollback(client, name, cfg.repretrain.alias, args.rollback)
            print(
                f"rolled back: {name}@{cfg.repretrain.alias} {old} -> {new}; re-pretraining on hold"
            )
        else:
            registry.release(client, name)
            print(f"released: re-pretraining of {name} resumes on the next run")
        return EXIT_OK
    outcome = repretrain(cfg)
    print(outcome.message)
    return outcome.code


if __name__ == "__main__":
    run_main(main)

"""One scheduled re-pretraining run: what is new, the candidate's config and warm start, training, the gate,
registration and promotion (see the package docstring)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
from pathlib import Path

from data_ingest import keys
from data_ingest.demo_data import build_demo_experiment
from data_ingest.source import ALL, SomaCellSource
from data_ingest.vocab import GeneVocab
from jobs.repretrain.config import RepretrainExperiment
from jobs.repretrain.gate import decide, evaluate_gate, flat_metrics
from jobs.repretrain.state import (
    EVALUATED,
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_GATE_FAILED,
    EXIT_OK,
    INIT_DIR,
    PLANNED,
    PROMOTED,
    PROMOTED_DIR,
    REGISTERED,
    REJECTED,
    RUNS_DIR,
    STATE_FILE,
    TRAIN_DIR,
    TRAINED,
    Outcome,
    RunState,
)
from scgpt_dist.train import registry
from scgpt_dist.train.checkpoint import load_consolidated
from scgpt_dist.train.driver import run_pretraining
from scgpt_dist.train.tracking import tracking_uri
from scgpt_dist.train.warmstart import extended_vocab, warm_start_state, write_model_dir

log = logging.getLogger("jobs.repretrain")


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


def candidate_config(
    cfg: RepretrainExperiment, run_dir: Path, promoted, target, new_datasets, n_batches: int
):
    """The pretraining config of the candidate: the job's data and training settings; with a promoted
    model, its model and tokenizer settings, warm start and replay."""
    c = cfg.experiment()
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


def repretrain(cfg: RepretrainExperiment) -> Outcome:
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
            metrics=[
                _metric(k, v) for k, v in flat_metrics(state.metrics).items() if math.isfinite(v)
            ],
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

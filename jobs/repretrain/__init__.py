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

Modules: `config` (the job's settings: `RepretrainExperiment` = experiment config + `repretrain` section),
`state` (exit codes, layout, the run state file), `gate` (evaluation and decision), `job` (one run), `cli`.
"""

from jobs.repretrain.cli import main
from jobs.repretrain.config import (
    GateConfig,
    RepretrainConfig,
    RepretrainExperiment,
    load_repretrain_config,
)
from jobs.repretrain.gate import decide, evaluate_gate
from jobs.repretrain.job import _is_newer, candidate_config, repretrain
from jobs.repretrain.state import (
    EVALUATED,
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_USER_ERROR,
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

__all__ = [
    "EVALUATED",
    "EXIT_CONFLICT",
    "EXIT_FAILED",
    "EXIT_GATE_FAILED",
    "EXIT_OK",
    "EXIT_USER_ERROR",
    "INIT_DIR",
    "PLANNED",
    "PROMOTED",
    "PROMOTED_DIR",
    "REGISTERED",
    "REJECTED",
    "RUNS_DIR",
    "STATE_FILE",
    "TRAIN_DIR",
    "TRAINED",
    "GateConfig",
    "Outcome",
    "RepretrainConfig",
    "RepretrainExperiment",
    "RunState",
    "_is_newer",
    "candidate_config",
    "decide",
    "evaluate_gate",
    "load_repretrain_config",
    "main",
    "repretrain",
]

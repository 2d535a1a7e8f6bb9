"""Experiment configuration: one dataclass per component, composed into `ExperimentConfig`.

Loaded from YAML (`jobs/configs/*.yaml`) with `a.b=c` overrides from the command line. Unknown keys are errors
that name the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_ingest.source import SourceConfig
from data_ingest.stream import StreamConfig
from data_ingest.tokenize import TokenizerConfig
from scgpt_dist.model.config import ModelConfig, ObjectiveConfig
from scgpt_dist.model.losses import model_problems


@dataclass
class ReplayConfig:
    """Continued pretraining on new data plus a replay sample of the old (set by `jobs.repretrain`)."""

    new_datasets: list[str] | None = None
    """Values of `source.batch_key` (dataset ids) that are new: all their training cells are used. None
    trains on every selected cell (no replay selection)."""
    fraction: float = 0.25
    """Share of the other (old) training cells mixed in, chosen by a hash of soma_joinid (stable)."""
    seed: int = 1
    """Seed of the replay hash (independent of the holdout split)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"data.replay.fraction={self.fraction}; choose a share in [0, 1]")


@dataclass
class DataConfig:
    """Cells, tokenization and the stream that feeds training."""

    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vocab_path: str | None = None
    """vocab.json to use; None builds one from the experiment's genes."""
    build_demo: bool = False
    """Build the embedded demo SOMA experiment at `source.soma_uri` when it does not exist."""
    demo_synth_cells: int = 2000
    """Synthetic cells added to the demo experiment next to pbmc68k_reduced."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """Per-rank streaming: global chunk shuffle, I/O buffer, prefetch, read-task CPUs (exact resume)."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """New data + a replay sample of old data (re-pretraining)."""


LR_SCHEDULES = ("cosine", "constant", "wsd")
DRAIN_ACTIONS = ("checkpoint", "stop")


@dataclass
class TrainConfig:
    """Optimisation and the distributed run."""

    num_workers: int = 2
    """Ray Train workers (ranks)."""
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    """Logical CPUs each worker reserves (its torch threads are `torch_threads`). With the read tasks'
    `data.stream.read_task_cpus` the defaults fit a 2-CPU Ray node: 2 x 0.5 + 2 x 0.5. GPU presets set more
    (e.g. 8 per GPU worker) so the rest of a node feeds Ray Data."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    micro_batch_size: int = 16
    """Cells per rank per forward pass."""
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    weight_decay_all: bool = False
    """Decay every parameter. False (default) decays only matrices of linear layers: LayerNorm weights,
    biases and embedding tables are not decayed (decaying them shrinks the gene and value embeddings that
    the model is slowest to learn)."""
    warmup_steps: int = 30
    lr_schedule: str = "wsd"
    """After the linear warmup: `cosine` (decay to `min_lr_ratio` x lr at max_steps), `constant`, or `wsd`
    (warmup-stable-decay: constant, then linear decay to `min_lr_ratio` x lr over the last
    `decay_fraction` of the steps)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine and wsd)."""
    decay_fraction: float = 0.2
    """Share of `max_steps` over which `wsd` decays."""
    max_steps: int = 300
    """Optimizer steps in the whole run (a resumed run continues to this number)."""
    grad_clip: float = 1.0
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    checkpoint_every: int = 100
    """Steps between checkpoints (one is always written at the end)."""
    log_every: int = 10
    """Steps between metric log points (MLflow; the console progress line prints at log points)."""
    progress_every_s: float = 15.0
    """Least seconds between two console progress lines on rank 0 (0 = one at every log point)."""
    seed: int = 0
    torch_threads: int = 1
    """Intra-op threads per worker (CPU)."""
    stop_poll_s: float = 2.0
    """Seconds between checks for a stop request (SIGTERM to the job) or a draining node (`on_node_drain`);
    on SIGTERM the workers checkpoint after the current step and the job exits with 75
    (`scgpt_dist.train.preemption`)."""
    on_node_drain: str = "checkpoint"
    """When Ray drains a node that holds a rank (a spot notice, an autoscaler scale-down, KubeRay):
    `checkpoint` writes a checkpoint after the current step and trains on; when the node goes, Ray Train
    restarts the workers on the nodes left (or a replacement) and they resume from that checkpoint, so
    nothing is lost and nobody resubmits. `stop` checkpoints and ends the job with 75, as SIGTERM does (for
    a cluster that gets no replacement and is too small without the node)."""
    stall_timeout_s: float = 1800.0
    """A worker that makes no progress (no batch, no finished step, checkpoint or evaluation) for this long
    says what it is stuck in and exits (code 76), so the run fails or restarts instead of hanging; 0 = off."""
    stop_after_steps: int | None = None
    """Stop this invocation after reaching this step (testing / pre-emption); None runs to max_steps."""
    global_batch_size: int | None = None
    """Cells per optimizer step over all ranks. When set, `grad_accum` is derived from it as
    global / (micro_batch_size x num_workers), so the batch and LR schedule do not change with the
    worker count."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (less memory, ~30% more compute)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer state in CPU memory (GPU runs; needs ZeRO stage >= 1)."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may do after a worker dies; each resumes from the last checkpoint."""
    storage_path: str | None = None
    """Where `checkpoints/step_N` are stored: None = `output_dir`; else a shared local path or an
    object-store URI (`s3://bucket/prefix`, `gs://bucket/prefix`; credentials and endpoint from the
    environment, e.g. `AWS_ENDPOINT_URL` for S3-compatible stores). The consolidated model, the MLflow
    store and the small run files stay in `output_dir`."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept in `checkpoints/` (older ones are deleted once a newer one is committed)."""
    keep_best_checkpoint: bool = True
    """Also keep the checkpoint with the lowest training loss (over all ranks, since the last log point)."""
    placement_strategy: str = "PACK"
    """Ray placement of the workers: PACK (fill a node first) or SPREAD (one per node where possible)."""
    peak_tflops_per_worker: float | None = None
    """Accelerator peak (e.g. 989 for an H100 in bf16) for the MFU estimate; None logs no MFU."""
    init_from: str | None = None
    """Consolidated model directory (`model.safetensors`, same config and vocabulary) whose weights start a
    fresh run (warm start, e.g. `jobs.repretrain`); ignored when the run resumes from its own checkpoint."""

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"train.lr_schedule={self.lr_schedule!r}; choose one of {LR_SCHEDULES}"
            )
        if self.on_node_drain not in DRAIN_ACTIONS:
            raise ValueError(
                f"train.on_node_drain={self.on_node_drain!r}; choose one of {DRAIN_ACTIONS}"
            )
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(
                f"train.decay_fraction={self.decay_fraction}; choose a share in (0, 1]"
            )

    def resolved_grad_accum(self) -> int:
        """Micro-batches accumulated per optimizer step for this worker count."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_pass = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_pass:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size x num_workers = {per_pass}; change one of them"
            )
        return self.global_batch_size // per_pass


@dataclass
class EvalConfig:
    """Evaluation during training: every `every` steps the model is scored on a fixed sample of held-out
    cells and the scores are logged to MLflow as `eval/*` (held-out GEP next to context-free baselines,
    embedding kNN, mean cosine), so a run shows whether it learns while it runs."""

    every: int = 0
    """Steps between evaluations (and one at the last step); 0 turns evaluation off."""
    cells: int = 1000
    """Held-out cells in the sample (fewer if the experiment holds out fewer); split over the ranks."""
    baseline_cells: int = 4000
    """Training cells whose token means make the baselines (per gene, per gene x batch, per gene x type)."""
    mask_ratio: float | None = None
    """GEP mask ratio of the evaluation; None uses objectives.mask_ratio."""
    knn_k: int = 10
    """Neighbours of the kNN classifiers."""
    seed: int = 0
    """Seed of the sample, its masks and the kNN folds."""


@dataclass
class MlflowConfig:
    """Where a job's runs go; pretraining, sweeps and the scale ablation share it (each with its own default
    experiment)."""

    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else a sqlite store in the output directory."""
    experiment: str = "scgpt-dist"
    registered_model: str | None = None
    """Register the consolidated model under this name in the MLflow model registry; None skips it."""
    system_metrics: bool = True
    """Log CPU / memory (and GPU where present) system metrics of the driver to the run."""


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster address; None uses $RAY_ADDRESS (as under `ray job submit`) or starts a local one."""
    num_cpus: int | None = None
    """Logical CPUs of a local cluster; None = cores + workers, so read tasks never starve."""
    object_store_mb: int | None = None
    """Object store of a local cluster, MB; None = Ray's default (30% of RAM). Each rank's stream keeps at
    most about a buffer and its running read tasks' records there (`(data.stream.buffer_size + prefetch x
    task_cells) x max_seq_len x 3` bytes: 506 MiB at the defaults and 1,200 tokens); pages of the store
    once touched stay resident (shared memory) until Ray stops. On a cluster set it with `ray start
    --object-store-memory`."""
    resource_check: str = "auto"
    """Before training, compare what the run needs (workers x `train.cpus_per_worker` + one read task of
    `data.stream.read_task_cpus`; GPUs) with the cluster's resources: `error` stops with one line giving the
    numbers and the knobs, `warn` logs that line and goes on (an autoscaler may still add nodes), `ignore`
    skips it. `auto`: `error` on a local instance, `warn` on a cluster you connect to."""


@dataclass
class ExperimentConfig:
    name: str = "scgpt"
    output_dir: str = "outputs/run"
    """Checkpoints (`checkpoints/step_N`), consolidated model (`model/`) and MLflow store go here."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.n_bins != self.data.tokenizer.n_bins:
            raise ValueError(
                f"model.n_bins={self.model.n_bins} but data.tokenizer.n_bins={self.data.tokenizer.n_bins}; "
                "set both to the same value"
            )
        if self.train.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.train.zero_stage}; choose 0, 1, 2 or 3")
        if self.train.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                f"train.placement_strategy={self.train.placement_strategy!r}; choose PACK or SPREAD"
            )
        self.train.resolved_grad_accum()
        if self.train.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision={self.train.precision!r}; choose fp32, bf16 or fp16")
        problems = model_problems(self.model, self.objectives)
        if problems:
            raise ValueError(problems[0])
        if self.model.cce_batch_offset and not self.objectives.cce:
            raise ValueError(
                "model.cce_batch_offset is a vector CCE adds to each view; set objectives.cce > 0 "
                "or model.cce_batch_offset=false"
            )
        thinned = self.objectives.cce > 0 and self.objectives.cce_view == "thinned"
        if thinned and not self.data.tokenizer.thinned_view:
            raise ValueError(
                "objectives.cce_view=thinned needs data.tokenizer.thinned_view (a keep probability, "
                "e.g. 0.5) so that the records carry thinned views; set it or choose another cce_view"
            )
        if self.model.d_model % self.model.n_heads:
            raise ValueError(
                f"model.d_model={self.model.d_model} is not divisible by model.n_heads={self.model.n_heads}"
            )


class ConfigError(ValueError):
    """A configuration key or value the user must fix."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass `cls` from nested dicts; unknown keys raise `ConfigError`."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    if hasattr(
        cls, "expand_preset"
    ):  # a named preset (ModelConfig.size) fills in the fields left unset
        try:
            data = cls.expand_preset(data)
        except ValueError as err:
            raise ConfigError(f"{path or 'config'}: {err}") from err
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {where!r}{hint} (valid here: {', '.join(names)})"
            )
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, where)
        else:
            kwargs[key] = _coerce(value, typ, where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or 'config'}: {err}") from err


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}={value!r} does not fit type {typ}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (inner,) = typing.get_args(typ) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is Any:
        return value
    if typ is str and isinstance(value, datetime.date):  # YAML reads `2025-01-30` as a date
        return value.isoformat()
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float) and isinstance(value, str):  # YAML reads `3e-4` as a string
        try:
            return typ(value)
        except ValueError:
            raise ConfigError(f"{where} must be {typ.__name__}, got {value!r}") from None
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if (
        typ in (int, float, str)
        and not isinstance(value, typ)
        or (typ is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where} must be {typ.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to nested dicts."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type = ExperimentConfig
) -> ExperimentConfig:
    """Load an experiment config (`cls`: ExperimentConfig or a job's subclass with its own sections) from
    YAML (or defaults) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file at {path}; see jobs/configs/ for presets")
        data = yaml.safe_load(path.read_text()) or {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


RETIRED_SECTIONS = ("repretrain",)
"""Sections a saved config.yaml may carry from before they moved to their job (`jobs.repretrain` owns its
settings now); `saved_config` skips them so older model directories and checkpoints still load."""


RENAMED_KEYS = {("data", "stream", "token_cache", "row_group_cells"): "record_batch_cells"}
"""Keys a saved config.yaml may carry under an older name (the token cache's Parquet row groups became Arrow
record batches); `saved_config` reads them under the new one."""


EARLIER_DEFAULTS = {("data", "stream", "chunk_order"): "random"}
"""Settings added with a new default that changes what a run does, and the behaviour a saved config.yaml
written before them had: `saved_config` fills them in, so a checkpoint resumes the epoch order it started
(its chunks were in a uniform random order before the stratified one)."""


def saved_config(data: dict[str, Any] | None) -> ExperimentConfig:
    """The ExperimentConfig of a model directory's or checkpoint's config.yaml (parsed)."""
    kept = copy.deepcopy({k: v for k, v in (data or {}).items() if k not in RETIRED_SECTIONS})
    for (*path, old), new in RENAMED_KEYS.items():
        section = _section(kept, path)
        if section is not None and old in section:
            section.setdefault(new, section.pop(old))
    for (*path, name), value in EARLIER_DEFAULTS.items():
        section = _section(kept, path)
        if section is not None:
            section.setdefault(name, value)
    return from_dict(ExperimentConfig, kept)


def _section(data: dict, path: list[str]) -> dict | None:
    for name in path:
        data = data.get(name) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

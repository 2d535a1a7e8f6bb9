"""Typed task configuration: every downstream task's settings are one dataclass (like pretraining's), and its
command line is generated from the fields, so a flag, a sweep parameter and a config key are the same name.

    @dataclass
    class AnnotationConfig(TaskConfig):
        label_key: str = arg("cell_type", "obs column with the cell types")
        epochs: int = arg(15)

    python -m jobs.finetune annotation --label-key cell_type --epochs 15 ...   # flags from the fields
    AnnotationConfig(data="pbmc68k_reduced", out="outputs/annot", epochs=5)    # the same, in Python
    with_params(cfg, {"lr": 5e-4})                                             # a sweep cell: checked, typed

A field `x_y` is the flag `--x-y`; a `bool` field is a switch (`--no-umap` sets `no_umap=True`); a
`list[str]` field takes one or more values; `str | None` / `int | None` fields are optional.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any


def arg(
    default: Any = None,
    help: str = "",  # noqa: A002  (argparse's name for it)
    *,
    choices: tuple[str, ...] | None = None,
    required: bool = False,
) -> Any:
    """A task setting: its default, its `--help` line, allowed values, and whether it must be given."""
    meta = {"help": help, "choices": choices, "required": required}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


PBMC_SPEC = "pbmc68k_reduced"
FINETUNE_EXPERIMENT = "scgpt-dist-finetune"


@dataclass
class TaskConfig:
    """What every task takes: its cells, its checkpoint, where it writes, its MLflow run and its resources."""

    data: str = arg(
        None,
        f"cells: an .h5ad file, a local SOMA experiment URI, or `{PBMC_SPEC}` (bundled with scanpy)",
        required=True,
    )
    out: str = arg(None, "output directory (report.md, PNGs, results)", required=True)
    checkpoint: str | None = arg(
        None,
        "consolidated model directory (the `model/` folder `jobs.pretrain` writes); omit for tasks that "
        "only run baselines",
    )
    obs_filter: str | None = arg(None, "SOMA obs value_filter, e.g. \"tissue_general == 'blood'\"")
    max_cells: int | None = arg(None, "subsample to this many cells")
    seed: int = arg(0)
    tracking_uri: str | None = arg(
        None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or a sqlite store in --out)"
    )
    experiment: str = arg(FINETUNE_EXPERIMENT, "MLflow experiment")
    parent_run_id: str | None = arg(None, "MLflow parent run (set by sweeps)")
    num_cpus: float = arg(1.0, "CPUs of the Ray task")
    num_gpus: float = arg(0.0, "GPUs of the Ray task")
    threads: int | None = arg(
        None,
        "torch intra-op threads (default: the task's --num-cpus; more threads than CPUs thrash)",
    )

    def __post_init__(self) -> None:
        missing = [
            f"--{flag(f.name)}" for f in required_fields(type(self)) if not getattr(self, f.name)
        ]
        if missing:
            raise ValueError(f"{type(self).__name__}: {', '.join(missing)} must be given")

    def params(self) -> dict[str, Any]:
        """The settings that are set, for the MLflow run's parameters."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def flag(name: str) -> str:
    return name.replace("_", "-")


def required_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("required")]


def _field_type(hint: Any) -> tuple[type, bool]:
    """(the value type, whether it is a list) of a field annotation such as `int | None` or `list[str]`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the config dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ, many = _field_type(hints[f.name])
        meta = f.metadata
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help") or None}
        if typ is bool:
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch must default to False")
            parser.add_argument(f"--{flag(f.name)}", action="store_true", **kw)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw.update(type=typ, default=default, required=bool(meta.get("required")))
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if many:
            kw["nargs"] = "+"
        parser.add_argument(f"--{flag(f.name)}", **kw)


def from_namespace(cls: type, ns: argparse.Namespace):
    """The config `cls` from parsed arguments (other attributes of `ns` are ignored)."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def with_params(cfg, params: dict[str, Any]):
    """`cfg` with `params` (field names; `--flag-style` names accepted) replaced, each checked and converted
    to its field's type: how a sweep cell sets its parameters."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in params.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; settings: {sorted(names)}"
            raise ValueError(f"{cls.__name__} has no setting {key!r}{hint}")
        changes[name] = _convert(value, hints[name], f"{cls.__name__}.{name}")
    return dataclasses.replace(cfg, **changes)


def _convert(value: Any, hint: Any, where: str) -> Any:
    typ, many = _field_type(hint)
    if value is None:
        return None
    if many:
        values = value if isinstance(value, list | tuple) else [value]
        return [_convert(v, typ, where) for v in values]
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} is a switch (true / false), got {value!r}")
        return value
    try:
        return typ(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} expects type {typ.__name__}, got {value!r}") from err

"""scgpt_dist.tasks.config: every task's settings are one dataclass; its flags, a sweep's parameters and the
Python constructor agree."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from scgpt_dist.tasks import TASKS, task_module
from scgpt_dist.tasks.config import TaskConfig, add_config_arguments, from_namespace, with_params


def parser_of(cls) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, cls)
    return parser


@pytest.mark.parametrize("task", TASKS)
def test_every_task_exports_a_config_whose_defaults_are_its_flags_defaults(task):
    module = task_module(task)
    assert issubclass(module.Config, TaskConfig) and callable(module.run) and module.DESCRIPTION
    parsed = from_namespace(
        module.Config, parser_of(module.Config).parse_args(["--data", "d", "--out", "o"])
    )
    assert parsed == module.Config(data="d", out="o")


def test_flags_are_typed_and_switches_lists_and_choices_work():
    cls = task_module("annotation").Config
    argv = ["--data", "d", "--out", "o", "--lr", "0.01", "--epochs", "3", "--no-scratch"]
    argv += ["--query-key", "dataset_id", "--query-values", "a", "b"]
    cfg = from_namespace(cls, parser_of(cls).parse_args(argv))
    assert (cfg.lr, cfg.epochs, cfg.no_scratch, cfg.query_values) == (0.01, 3, True, ["a", "b"])
    grn = task_module("grn").Config
    with pytest.raises(argparse.ArgumentError):
        parser_of(grn).parse_args(["--data", "d", "--out", "o", "--attention-norm", "mean"])


def test_required_settings_and_unknown_or_mistyped_params_say_what_to_fix():
    cls = task_module("integration").Config
    with pytest.raises(ValueError, match="--data, --out must be given"):
        cls()
    cfg = cls(data="d", out="o")
    changed = with_params(cfg, {"epochs": "4", "--no-dsbn": True, "batch_key": None})
    assert (changed.epochs, changed.no_dsbn, cfg.epochs) == (4, True, 30)
    with pytest.raises(ValueError, match="no setting 'epoch'; did you mean 'epochs'"):
        with_params(cfg, {"epoch": 4})
    with pytest.raises(ValueError, match="expects type int, got 'many'"):
        with_params(cfg, {"epochs": "many"})


def test_a_subclass_overrides_a_default_and_keeps_the_rest():
    integ, multi = task_module("integration").Config, task_module("multiomics").Config
    assert multi(data="d", out="o").epochs == 15 and integ(data="d", out="o").epochs == 30
    base = {f.name for f in dataclasses.fields(integ)}
    assert base < {f.name for f in dataclasses.fields(multi)}

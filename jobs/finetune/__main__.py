"""Finetune / evaluate a pretrained model on one downstream task, with baselines, as a Ray task.

python -m jobs.finetune <task> --checkpoint outputs/demo/model --data pbmc68k_reduced --out outputs/annot

The tasks live in `scgpt_dist.tasks` (one package each); their flags are made from their config dataclasses.
Each task writes `<out>/report/report.md` (tables + PNGs, also MLflow artifacts) and logs its metrics to one
MLflow run. `python -m jobs.finetune --help` lists the tasks.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs._cli import run_main, setup_logging
from scgpt_dist.tasks import TASKS, task_module
from scgpt_dist.tasks.config import add_config_arguments, from_namespace
from scgpt_dist.tasks.runner import execute, execute_as_ray_task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.finetune", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task in TASKS:
        module = task_module(task)
        p = sub.add_parser(task, help=module.DESCRIPTION, description=module.DESCRIPTION)
        add_config_arguments(p, module.Config)
        p.add_argument(
            "--in-process", action="store_true", help="run in this process instead of as a Ray task"
        )
    return parser


def parse_task(argv: list[str]) -> tuple[str, object, bool]:
    """(task name, its config, whether to run in this process) from a command line."""
    args = build_parser().parse_args(argv)
    return args.task, from_namespace(task_module(args.task).Config, args), args.in_process


def main(argv: list[str] | None = None) -> int:
    task, cfg, in_process = parse_task(sys.argv[1:] if argv is None else argv)
    setup_logging()
    result = execute(task, cfg) if in_process else execute_as_ray_task(task, cfg)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))

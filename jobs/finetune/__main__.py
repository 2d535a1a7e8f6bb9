"""Finetune / evaluate a pretrained model on one downstream task, with baselines, as a Ray task.

python -m jobs.finetune <task> --checkpoint outputs/demo/model --data pbmc68k_reduced --out outputs/annot

Each task writes `<out>/report/report.md` (tables + PNGs, also MLflow artifacts) and logs its metrics to one
MLflow run. `python -m jobs.finetune --help` lists the tasks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from jobs._cli import run_main, setup_logging
from jobs.finetune.common import add_common_arguments, execute, execute_as_ray_task

TASKS = {
    "annotation": "jobs.finetune.annotation",
    "integration": "jobs.finetune.integration",
    "perturbation": "jobs.finetune.perturbation",
    "multiomics": "jobs.finetune.multiomics",
    "grn": "jobs.finetune.grn",
    "zeroshot": "jobs.finetune.zeroshot",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.finetune", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, module_name in TASKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # a task not written yet
        p = sub.add_parser(task, help=module.DESCRIPTION, description=module.DESCRIPTION)
        add_common_arguments(p)
        p.add_argument(
            "--in-process", action="store_true", help="run in this process instead of as a Ray task"
        )
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    module_name = TASKS[args.task]
    if args.in_process:
        result = execute(args.task, importlib.import_module(module_name), args)
    else:
        result = execute_as_ray_task(args.task, module_name, args)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))

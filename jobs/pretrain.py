"""Pretrain (or resume) scGPT on Ray Train + DeepSpeed.

    python -m jobs.pretrain --config jobs/configs/demo.yaml [key.sub=value ...]
    ray job submit --address http://127.0.0.1:8265 -- python -m jobs.pretrain --config ... [overrides]

Running again with the same `output_dir` resumes from its latest complete checkpoint. Exit codes: 0 done,
2 bad input (one `error:` line), 75 stopped early by a preemption signal (SIGTERM to the job, or a draining
node with `train.on_node_drain=stop`) after writing a checkpoint: run the same command again to continue.
"""

from __future__ import annotations

import argparse
import json

from jobs._cli import quiet_ray_data, run_main, setup_logging
from scgpt_dist.config import load_config
from scgpt_dist.train.driver import run_pretraining
from scgpt_dist.train.preemption import EXIT_PREEMPTED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.pretrain", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help="experiment YAML (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    setup_logging()

    cfg = load_config(args.config, args.overrides)
    quiet_ray_data()

    summary = run_pretraining(cfg)
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k != "result_metrics"}, indent=1, default=str
        )
    )
    return EXIT_PREEMPTED if summary.get("preempted") else 0


if __name__ == "__main__":
    run_main(main)

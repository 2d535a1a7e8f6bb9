"""`python -m jobs.repretrain`: one scheduled run, or a rollback / release of the promoted alias."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs._cli import quiet_ray_data, setup_logging
from jobs.repretrain.config import load_repretrain_config
from jobs.repretrain.job import repretrain
from jobs.repretrain.state import EXIT_OK
from scgpt_dist.train import registry
from scgpt_dist.train.tracking import tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.repretrain",
        description="Scheduled re-pretraining: follow the data, continue from the promoted model, gate, promote.",
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

    cfg = load_repretrain_config(args.config, args.overrides)
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

"""Consolidate a sharded training checkpoint (any ZeRO stage) into `model.safetensors` + config + vocab.

python -m jobs.consolidate --checkpoint outputs/demo/checkpoints/step_00000300 --out outputs/demo/model
"""

from __future__ import annotations

import argparse

from jobs._cli import run_main, setup_logging
from scgpt_dist.train.checkpoint import consolidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.consolidate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step_<N> directory")
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    args = parser.parse_args(argv)
    setup_logging()

    print(f"wrote {consolidate(args.checkpoint, args.out)}")
    return 0


if __name__ == "__main__":
    run_main(main)

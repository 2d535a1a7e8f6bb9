"""Move models between the reference scGPT checkpoint format and ours.

python -m jobs.interchange import --ref path/to/scGPT_human --out outputs/imported/model
python -m jobs.interchange export --model outputs/demo/model --out outputs/demo/scgpt_ref [--style torch]

A reference directory holds best_model.pt (a state dict; loaded with weights_only=True), args.json and
vocab.json. Ours is a consolidated model directory (model.safetensors, config.yaml, vocab.json).
"""

from __future__ import annotations

import argparse

from jobs._cli import run_main, setup_logging
from scgpt_dist.interchange import export_reference, import_reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.interchange", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="reference checkpoint directory -> our model directory")
    imp.add_argument(
        "--ref", required=True, help="directory with best_model.pt, args.json, vocab.json"
    )
    imp.add_argument("--out", required=True, help="model directory to write (replaced atomically)")
    imp.add_argument(
        "--drop-unknown",
        action="store_true",
        help="import even when the checkpoint has tensors our model has no place for",
    )
    exp = sub.add_parser("export", help="our model directory -> reference checkpoint directory")
    exp.add_argument("--model", required=True, help="a consolidated model directory")
    exp.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    exp.add_argument(
        "--style",
        choices=("flash", "torch"),
        default="flash",
        help="attention key names: flash (Wqkv, as the released models) or torch (in_proj_*)",
    )
    args = parser.parse_args(argv)
    setup_logging()

    if args.command == "import":
        out = import_reference(args.ref, args.out, drop_unknown=args.drop_unknown)
    else:
        out = export_reference(args.model, args.out, style=args.style)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""`python -m jobs.bench <mode> ...`: dispatch to `jobs.bench.<mode>.main`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from jobs._cli import run_main


def modes() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not m.name.startswith("_")
    )


def main() -> int:
    available = modes()
    if len(sys.argv) < 2 or sys.argv[1] not in available:
        print(f"usage: python -m jobs.bench {{{','.join(available)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jobs.bench.{sys.argv[1]}")
    return module.main(sys.argv[2:])


if __name__ == "__main__":
    run_main(main)

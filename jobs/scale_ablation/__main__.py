"""`python -m jobs.scale_ablation`: see jobs/scale_ablation/__init__.py."""

import sys

from jobs._cli import run_main
from jobs.scale_ablation.job import main

if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))

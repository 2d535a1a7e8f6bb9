"""python -m jobs.sweep --config jobs/configs/sweep_annotation.yaml [--concurrency 2] [--dry-run]"""

import sys

from jobs._cli import run_main
from jobs.sweep.driver import main

if __name__ == "__main__":
    # Ray pickles the cell function by reference: the importable module's `main`, not a __main__ copy.
    run_main(lambda: main(sys.argv[1:]))

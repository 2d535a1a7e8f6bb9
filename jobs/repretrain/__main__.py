"""python -m jobs.repretrain --config jobs/configs/repretrain.yaml [key.sub=value ...]"""

from jobs._cli import run_main
from jobs.repretrain.cli import main

if __name__ == "__main__":
    run_main(main)

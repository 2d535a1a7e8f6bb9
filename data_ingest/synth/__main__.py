"""python -m data_ingest.synth --out census/ --cells 100000 --genes 20000"""

from data_ingest.cli import run_main
from data_ingest.synth.census import main

if __name__ == "__main__":
    run_main(main)

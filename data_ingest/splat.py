"""`python -m data_ingest.splat`: the name the Splat simulator's command had before the generators moved to
`data_ingest/synth/`; it runs `python -m data_ingest.synth.splat` unchanged."""

from data_ingest.cli import run_main
from data_ingest.synth.splat import main

if __name__ == "__main__":
    run_main(main)

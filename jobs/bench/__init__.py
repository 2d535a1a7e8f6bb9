"""Benchmarks: `python -m jobs.bench <mode> [options]`. Each mode measures side by side in one run and prints a
table; none of them is a timed test. Modes live in sibling modules (`jobs/bench/<mode>.py`) exposing
`main(argv) -> int`."""

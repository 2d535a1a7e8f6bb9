"""The loader benchmark's shuffle-quality figures (pure functions; the benchmark itself is run by hand)."""

import numpy as np
import pytest

from jobs.bench.data import _distinct, _tv


def test_tv_distance_to_the_global_mix():
    labels = np.repeat(np.arange(8), 64)  # 8 datasets, stored grouped
    grouped = list(labels.reshape(-1, 64))  # contiguous reads: one dataset per batch
    assert _distinct(grouped) == 1.0
    assert _tv(grouped) == pytest.approx(7 / 8)  # each batch: all of one dataset against 1/8 each
    mixed = list(
        np.tile(np.arange(8), 64).reshape(-1, 64)
    )  # every batch has the global proportions
    assert _tv(mixed) == pytest.approx(0.0) and _distinct(mixed) == 8.0
    shuffled = list(np.random.default_rng(0).permutation(labels).reshape(-1, 64))
    assert 0.05 < _tv(shuffled) < 0.3  # a uniform shuffle's floor for a finite batch
    # Many datasets touched but one dominating: distinct datasets looks fine, TV does not.
    dominated = np.concatenate([np.zeros(57, int), np.arange(1, 8)])  # 57 of 64 cells from one
    both = [dominated, np.arange(64) % 8] * 4
    assert _distinct(both) == 8.0 and _tv(both) == pytest.approx(0.383, abs=1e-3)
    assert _tv([]) == 0.0


def test_reader_specs_name_their_own_chunk_and_buffer():
    from jobs.bench.data import _reader_spec

    assert _reader_spec("ours") == ("ours", 0, 0, "")
    assert _reader_spec("ours:2048:65536") == ("ours", 2048, 65536, "")
    assert _reader_spec("ours-cached:256:131072") == ("ours-cached", 256, 131072, "")
    assert _reader_spec("ours-cold") == ("ours-cold", 0, 0, "")
    assert _reader_spec("ours:256:131072:random") == ("ours", 256, 131072, "random")
    for bad in ("raw:1:2", "ours:2048", "theirs", "ours:256:131072:sorted"):
        with pytest.raises(ValueError, match="unknown reader"):
            _reader_spec(bad)


def test_the_benchmark_command_line_parses(capsys):
    from jobs.bench.data import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--chunk-order" in capsys.readouterr().out

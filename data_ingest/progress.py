"""Progress bars for long single-process work (census writing, ingest, embedding, benchmarks).

On a terminal: a tqdm bar. Anywhere else (a pipe, `ray job logs`, CI, a log file): the same bar as a plain
line every `every_s` seconds and at the end, never carriage-return redraws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    every_s: float = 15.0,
    stream=None,
) -> tqdm:
    """A tqdm bar (use as an iterable wrapper or call `.update(n)`); plain lines when not on a TTY."""
    stream = stream if stream is not None else sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=stream if tty else _Lines(stream),
        mininterval=0.2 if tty else every_s,
        ascii=not tty,
        dynamic_ncols=tty,
        ncols=None if tty else 100,
        unit_scale=True,
    )

"""Command-line plumbing shared by every `python -m data_ingest.*` and `python -m jobs.*` entry point:
bad input ends in one line that names the problem and the fix, exit code 2, no traceback.

Set `SCGPT_TRACEBACK=1` (or pass `--debug` where an entry point offers it) to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
"""Exceptions that mean bad input (a path, a value, a file), not a bug."""

EXIT_USAGE = 2
"""Exit code of a run stopped by bad input (argparse's, too)."""


def _soma_errors() -> tuple[type[BaseException], ...]:
    try:
        import tiledbsoma

        return (tiledbsoma.DoesNotExistError,)
    except ImportError:
        return ()


def run_main(
    fn: Callable[[], int | None], extra_errors: tuple[type[BaseException], ...] = ()
) -> None:
    """Run `fn` and exit with its code; a user error exits 2 with `error: <message>` on stderr."""
    try:
        code = fn()
    except USER_ERRORS + _soma_errors() + extra_errors as err:
        if os.environ.get("SCGPT_TRACEBACK") or "--debug" in sys.argv[1:]:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(code or 0)

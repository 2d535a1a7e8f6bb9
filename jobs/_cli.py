"""Shared command-line plumbing: logging, config loading and one-line errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from data_ingest.cli import run_main as _run_main
from scgpt_dist.config import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("SCGPT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def quiet_ray_data() -> None:
    """Ray Data's progress bars flood `ray job logs`; our own log lines say what happens."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def run_main(fn: Callable[[], int | None]) -> None:
    """Run `fn`; a user error (bad input, config, path) exits 2 with one clear line instead of a traceback
    (`data_ingest.cli.run_main`; `SCGPT_TRACEBACK=1` shows the traceback)."""
    _run_main(fn, extra_errors=(ConfigError,))

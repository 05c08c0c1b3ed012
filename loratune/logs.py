"""Logging for rule scripts: everything a step prints goes to its Snakemake log file."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path


def log_to_file(path: str | Path) -> None:
    """Send stderr, warnings and the ``loratune`` logger to ``path`` (line-buffered)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "w", buffering=1)
    sys.stderr = stream
    logging.basicConfig(
        stream=stream,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)


@contextmanager
def one_line_errors():
    """End a step whose input is bad (a dataset, a model, named by their config field) with that
    one line in its log instead of a traceback: the message already says what to fix."""
    try:
        yield
    except (ValueError, OSError) as error:
        logging.getLogger("loratune").error("%s", error)
        sys.exit(1)

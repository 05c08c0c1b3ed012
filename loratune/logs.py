"""Logging for rule scripts: everything a step prints goes to its Snakemake log file."""

from __future__ import annotations

import errno
import logging
import sys
from contextlib import contextmanager
from pathlib import Path


def log_to_file(path: str | Path) -> None:
    """Send stderr, warnings and the ``loratune`` logger to ``path`` (line-buffered)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Emptied, then appended to: a trial worker (loratune.training.worker) appends the trial's
    # own lines to the same file, and every write here must land after them, not over them.
    open(path, "w").close()
    stream = open(path, "a", buffering=1)
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
    one line in its log instead of a traceback: the message already says what to fix. A full
    disk ends it with one line on the job's own stderr (writing the log would fail too)."""
    try:
        yield
    except (ValueError, OSError) as error:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            # The log may sit on the full disk too: say it where Snakemake shows it.
            message = f"loratune: disk full: {error.filename or error}; free space and run again"
            print(message, file=sys.__stderr__, flush=True)
            sys.exit(1)
        logging.getLogger("loratune").error("%s", error)
        sys.exit(1)

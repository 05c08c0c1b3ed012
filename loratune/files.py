"""Atomic file writing: a reader (or a rerun after a killed job) sees the old file or the new
one, never half of one.

A file is written to a temporary name in its own directory, flushed and fsynced, renamed over
the target, and the directory is fsynced so the rename survives a power cut. Snakemake then
sees either a missing output or a complete one. Study tables, trial metrics, the prepared
dataset, model markers and the HTML plots are all written this way.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["atomic_write_text", "atomic_write_json", "jsonable", "plain_scalar"]


def _fsync_directory(directory: Path) -> None:
    # The rename lives in the directory entry; without this a power cut may undo it.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with 0o666 lets the umask decide the mode, as for a plain open().
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def plain_scalar(value: Any) -> Any:
    """A numpy scalar (as a pandas row holds them) as the Python value it holds; anything else as is."""
    return value.item() if isinstance(value, np.generic) else value


def _is_pandas_missing(value: Any) -> bool:
    # pandas is not imported for this: where it was never imported, no pd.NA or NaT can exist.
    pandas = sys.modules.get("pandas")
    return pandas is not None and (value is pandas.NA or value is pandas.NaT)


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, non-finite floats and pandas' missing values as null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    value = plain_scalar(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if _is_pandas_missing(value):
        return None
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2, NaN as null), atomically."""
    # Serialize fully before touching the disk: a value JSON cannot hold raises here.
    text = json.dumps(jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)

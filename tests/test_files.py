"""Atomic file writing: the old file or the new one, never half of one, and no temporary left."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loratune import files


def test_atomic_write_json_sorts_keys_indents_and_writes_nan_as_null(tmp_path):
    path = tmp_path / "deep" / "er" / "x.json"
    files.atomic_write_json(
        path,
        {"b": float("nan"), "a": [np.int64(3), np.float64(0.5), np.bool_(True)], "c": {"z": float("inf"), "y": None}},
    )
    assert path.read_text() == (
        '{\n  "a": [\n    3,\n    0.5,\n    true\n  ],\n  "b": null,\n'
        '  "c": {\n    "y": null,\n    "z": null\n  }\n}\n'
    )


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_failed_json_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    files.atomic_write_json(path, {"status": "ok"})
    with pytest.raises(TypeError):
        files.atomic_write_json(path, {"status": "ok", "bad": object()})
    assert json.loads(path.read_text()) == {"status": "ok"}
    assert leftovers(tmp_path) == []


def test_write_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.html"
    files.atomic_write_text(path, "old report")
    # The encoder fails on the lone surrogate after the temporary file has been created.
    with pytest.raises(UnicodeEncodeError):
        files.atomic_write_text(path, "new report " * 10_000 + "\ud800")
    assert path.read_text() == "old report"
    assert leftovers(tmp_path) == []

"""Checks of our Triton kernels run in a subprocess: on a CPU under Triton's interpreter, which
must be switched on before Triton is imported, so never in the test process itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_triton_check(script: str, device: str, args: list[str], timeout: int = 600) -> None:
    """Run ``script`` with ``device`` and ``args`` as its arguments, importing loratune from this
    checkout and the tests' helpers from this folder; on a CPU under Triton's interpreter. It must
    print ok and nothing else."""
    pytest.importorskip("triton")
    paths = [str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", script, device, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]

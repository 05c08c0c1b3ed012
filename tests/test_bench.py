"""The benchmark scripts' shared parts: bench/_preamble.py and bench/shapes.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.shapes import SHAPES, config_kwargs

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO.parent / "shared" / "bench" / "hf_qlora_baseline.py"
SCRIPTS = ["coordinates", "early_stopping", "search_efficiency", "warm_start"]


def test_the_shapes_are_those_of_the_plain_loop_baseline():
    """bench/throughput.py's shapes must be the ones bench/train_speed.py times through the baseline."""
    if not BASELINE.is_file():
        pytest.skip(f"{BASELINE} not found (../shared beside the checkout)")
    spec = importlib.util.spec_from_file_location("hf_qlora_baseline", BASELINE)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    from transformers import LlamaConfig

    assert baseline.SHAPES == SHAPES
    for shape in SHAPES:
        assert LlamaConfig(**config_kwargs(shape)).to_dict() == baseline.config_for(shape).to_dict()


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH")
    }
    return {**env, **extra}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_sets_one_thread_and_finds_the_repo_run_or_imported(script, tmp_path):
    # Run as a plain file from elsewhere, no PYTHONPATH: the preamble puts the repository on sys.path.
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{script}.py"), "--help"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # Imported as bench.<script> (as a test would): the thread settings hold before numpy loads.
    probe = (
        f"import bench.{script}, os, numpy; "
        "print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], bench._preamble.REPO)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout.split() == ["1", "1", str(REPO)]

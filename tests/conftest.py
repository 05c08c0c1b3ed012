"""Shared test helpers: run the real workflow in a scratch working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

# The 2024 study's search space (experiment 4 with alpha as a set), shared by the unit tests.
STUDY_SPACE = {
    "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4},
    "lora_alpha": {"type": "choice", "values": [4, 8, 16, 32, 64, 128, 256]},
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    "lora_dropout": {"type": "fixed", "value": 0.05},
}


@pytest.fixture(scope="session")
def study_space():
    """``STUDY_SPACE`` as a ``SearchSpace`` (immutable, so one per session)."""
    from loratune.space import SearchSpace

    return SearchSpace.from_config(STUDY_SPACE)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_test_config(name: str) -> dict:
    return yaml.safe_load((REPO / "tests" / "configs" / name).read_text())


def workflow_env() -> dict[str, str]:
    """The environment of a workflow run: this checkout's loratune, offline."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_workflow(workdir: Path, configfile: Path, *args: str, timeout: float = 900, check: bool = True,
                 profile: str | Path | None = "profiles/local") -> subprocess.CompletedProcess:
    """Run Snakemake on the repo's Snakefile in ``workdir``, the way a user runs it."""
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(configfile)]
    if profile:
        command += ["--profile", str(REPO / profile)]
    command += list(args)
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=workflow_env())
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}): {' '.join(command)}\n"
            f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def process_running(pid: int) -> bool:
    """Whether process ``pid`` still runs. One that exited but is not yet reaped (a zombie: an
    orphan waits for the container's init, which reaps now and then) runs no more and holds no memory."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


# ---- the training tests' tiny model and data ------------------------------------------
WORDS = "garden river stone cloud window pencil candle forest planet rocket silver orange".split()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer random-weight Llama with its tokenizer (tests/tiny_models.py), saved once per session."""
    from tiny_models import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Twelve reversed words, prepared: small enough to memorize in a few dozen steps."""
    from loratune.training import DatasetSpec, prepare_dataset

    folder = tmp_path_factory.mktemp("data")
    source = folder / "reverse.jsonl"
    source.write_text(
        "".join(json.dumps({"prompt": f"Reverse {w}:", "completion": f" {w[::-1]}"}) + "\n" for w in WORDS)
    )
    prepare_dataset(DatasetSpec(path=str(source), eval_fraction=0.25), folder / "prepared")
    return folder / "prepared"

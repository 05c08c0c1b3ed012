"""The whole DAG with real (tiny) training: trials that crash are recorded and the loop goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import load_test_config, run_workflow, write_config
from tiny_models import build_tiny_llama

pytestmark = pytest.mark.slow


def _alpaca(path: Path, n: int = 24) -> Path:
    rows = [{"instruction": f"Repeat the word number {i}.", "input": "", "output": f"word {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_crashed_trials_are_recorded_and_the_study_completes(tmp_path):
    config = load_test_config("tiny_qlora.yaml")
    config["model"]["name"] = str(build_tiny_llama(tmp_path / "tiny-llama"))
    config["dataset"]["path"] = str(_alpaca(tmp_path / "data.jsonl"))
    configfile = write_config(tmp_path / "config.yaml", config)
    run_workflow(tmp_path, configfile)

    out = tmp_path / "results" / "tiny-qlora"
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    failed = trials[trials.status == "failed"]
    ok = trials[trials.status == "ok"]
    assert len(failed) >= 1 and len(ok) >= 1
    assert (failed.learning_rate == 1e30).all() and (ok.learning_rate == 1e-3).all()
    assert failed.error.str.contains("LossDiverged").all()
    assert failed.eval_loss.isna().all() and ok.eval_loss.notna().all()
    # Both arms proposed after seeing the failures, and never a failed point again.
    for arm in ("gptune", "random"):
        proposed = trials[trials.arm == arm]
        assert len(proposed) == 1
        assert not set(proposed.trial_id) & set(trials[trials.arm == "pilot"].trial_id)
    metrics = json.loads(next(out.glob("seed0/trials/*/metrics.json")).read_text())
    for field in ("status", "train_loss", "eval_loss", "train_time", "tokens_per_second", "peak_memory_gib",
                  "trainable_params", "device", "provenance", "slurm_job_id", "cuda_visible_devices"):
        assert field in metrics
    kept = [p for p in out.glob("seed0/trials/*/adapter") if p.is_dir()]
    assert len(kept) == len(ok.drop_duplicates("trial_id"))
    assert "Pareto set of study 'tiny-qlora'" in (out / "summary.txt").read_text()

"""The whole DAG with real (tiny) training: trials that crash are recorded and the loop goes on."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from conftest import load_test_config, process_running, run_workflow, write_config
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


def test_trials_of_a_study_train_in_one_worker_with_their_own_logs(tmp_path):
    """resources.trial_worker: true on the CPU: every trial job hands its trial to the one worker
    of the CPU slot, which loads the base model once per run of ok trials; each job keeps its log."""
    config = load_test_config("tiny_qlora.yaml")
    config["model"]["name"] = str(build_tiny_llama(tmp_path / "tiny-llama"))
    config["dataset"]["path"] = str(_alpaca(tmp_path / "data.jsonl"))
    config["resources"] = {"gpus_per_trial": 1, "trial_worker": True, "worker_idle_seconds": 600}
    configfile = write_config(tmp_path / "config.yaml", config)
    run_workflow(tmp_path, configfile)

    out = tmp_path / "results" / "tiny-qlora"
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("seed0/trials/*/metrics.json")}
    workers = {m["worker"]["pid"] for m in records.values()}
    assert len(workers) == 1, workers  # one slot (the CPU), one worker for the whole study
    assert sorted(m["worker"]["trial"] for m in records.values()) == list(range(1, len(records) + 1))
    assert {m["status"] for m in records.values()} == {"ok", "failed"}
    for trial, m in records.items():
        log = (out / "seed0" / "trials" / trial / "train.log").read_text()
        handed = log.index("trial handed to the")
        if m["status"] == "ok":
            assert handed < log.rindex("step 3/3: held-out loss")  # the worker's lines, in the job's log
        else:
            # The job's own line after the worker's traceback lands after it, not over it.
            assert handed < log.index("LossDiverged") < log.rindex("recorded as failed")
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    assert (trials[trials.status == "failed"].learning_rate == 1e30).all()
    # The run's end (onsuccess) retired the idle worker: nothing of the study keeps running.
    pid = workers.pop()
    if process_running(pid):
        os.kill(pid, signal.SIGTERM)
        raise AssertionError(f"the trial worker {pid} outlived the study")

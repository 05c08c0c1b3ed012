"""A study whose objectives include an lm-eval metric, through real Snakemake: each trial is
evaluated in its own job, and re-running evaluation retrains nothing."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import load_test_config, run_workflow, write_config
from test_workflow_qlora import _alpaca
from tiny_models import build_tiny_llama

pytestmark = pytest.mark.slow

OBJECTIVE = "lm_eval.loratune_instruct.chrf"


def test_lm_eval_objective_runs_end_to_end_and_reevaluation_retrains_nothing(tmp_path):
    config = load_test_config("tiny_qlora.yaml")
    config["model"]["name"] = str(build_tiny_llama(tmp_path / "tiny-llama"))
    config["dataset"]["path"] = str(_alpaca(tmp_path / "data.jsonl", n=20))
    config["objectives"] = {"eval_loss": "min", OBJECTIVE: "max"}
    # Two trials: one trains, one diverges (learning rate 1e30).
    config["search_space"]["lora_rank"] = {"type": "fixed", "value": 4}
    config["pilot"]["n"] = 2
    config["arms"] = {"random": {"proposer": "random", "rounds": 0}}
    config["evaluation"] = {"tasks": ["loratune_instruct"], "limit": 2, "batch_size": 2}
    configfile = write_config(tmp_path / "config.yaml", config)
    run_workflow(tmp_path, configfile)

    out = tmp_path / "results" / "tiny-qlora"
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    assert len(trials) == 2
    ok, failed = trials[trials.status == "ok"], trials[trials.status == "failed"]
    # Every trained adapter was scored; a diverged trial has no adapter and a failed evaluation.
    assert len(ok) >= 1 and ok[OBJECTIVE].notna().all() and (ok.evaluation_status == "ok").all()
    assert failed[OBJECTIVE].isna().all() and (failed.evaluation_status == "failed").all()
    assert "lm_eval.loratune_instruct.exact_match" in trials.columns
    record = json.loads(next(out.glob(f"seed0/trials/{ok.trial_id.iloc[0]}/evaluation.json")).read_text())
    assert record["lm_eval_version"] and len(record["task_config_sha256"]) == 64
    assert record["n_documents"] == {"loratune_instruct": 2} and record["template"] == "alpaca"

    trained = {p: p.stat().st_mtime_ns for p in out.glob("seed0/trials/*/*") if p.name in ("metrics.json", "train.log")}
    evaluated = {p: p.stat().st_mtime_ns for p in out.glob("seed0/trials/*/evaluation.json")}
    assert len(trained) == 4 and len(evaluated) == 2
    run_workflow(tmp_path, configfile, "-R", "evaluate_trial")
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
    assert all(p.stat().st_mtime_ns > mtime for p, mtime in evaluated.items())

    # New evaluation settings re-run evaluation, and again nothing trains.
    evaluated = {p: p.stat().st_mtime_ns for p in evaluated}
    config["evaluation"]["limit"] = 3
    write_config(configfile, config)
    run_workflow(tmp_path, configfile)
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
    assert all(p.stat().st_mtime_ns > mtime for p, mtime in evaluated.items())
    record = json.loads(next(out.glob(f"seed0/trials/{ok.trial_id.iloc[0]}/evaluation.json")).read_text())
    assert record["n_documents"] == {"loratune_instruct": 3}


def test_a_trial_stopped_at_a_rung_is_evaluated_there_and_reevaluation_retrains_nothing(tmp_path):
    """Early stopping and an lm-eval objective: every rung's adapters are scored before promotion
    (step<k>/evaluation.json), so promotion judges the task metric too and the stopped trial
    keeps the score of the adapter its rung selected; the promoted one is scored again at its
    full budget."""
    config = load_test_config("tiny_qlora.yaml")
    config["model"]["name"] = str(build_tiny_llama(tmp_path / "tiny-llama"))
    config["dataset"]["path"] = str(_alpaca(tmp_path / "data.jsonl", n=20))
    config["objectives"] = {"eval_loss": "min", OBJECTIVE: "max"}
    config["search_space"]["learning_rate"] = {"type": "choice", "values": [1.0e-3, 3.0e-3]}
    config["training"]["max_steps"] = 4
    config["pilot"] = {"design": "grid", "n": 1}
    # Rung 0 at step 2 trains both proposals; one goes on to step 4, the other stops.
    halving = {"rungs": [0.5, 1.0], "keep": 0.5}
    config["arms"] = {"random": {"proposer": "random", "rounds": 1, "batch_size": 2, "early_stopping": halving}}
    config["evaluation"] = {"tasks": ["loratune_instruct"], "limit": 2, "batch_size": 2}
    configfile = write_config(tmp_path / "config.yaml", config)
    run_workflow(tmp_path, configfile)

    out = tmp_path / "results" / "tiny-qlora"
    trials = pd.read_csv(out / "trials.tsv", sep="\t")
    stopped = trials[trials.status == "stopped"]
    assert len(trials) == 3 and len(stopped) == 1 and (trials.status == "ok").sum() == 2
    assert trials[OBJECTIVE].notna().all() and (trials.evaluation_status == "ok").all()
    trial_dir = out / "seed0" / "trials" / stopped.trial_id.iloc[0]
    record = json.loads((trial_dir / "step2" / "evaluation.json").read_text())
    assert record["status"] == "ok" and record["trial_id"] == trial_dir.name
    # The rung kept the adapter it selected beside its record.
    assert tmp_path / record["adapter"] == trial_dir / "step2" / "adapter"
    rung = json.loads((trial_dir / "step2" / "metrics.json").read_text())
    assert record["best_step"] == rung["best_step"] <= 2
    assert stopped[OBJECTIVE].iloc[0] == record["lm_eval"]["loratune_instruct"]["chrf"]
    assert not (trial_dir / "evaluation.json").exists()  # it never reached its full budget
    # Promotion judged the lm-eval objective at the rung too: both trials have it there.
    promoted = pd.read_csv(out / "seed0" / "random" / "round1" / "rung0" / "promoted.tsv", sep="\t")
    assert promoted[OBJECTIVE].notna().all() and promoted.promoted.sum() == 1
    evaluated = {p: p.stat().st_mtime_ns for p in out.glob("seed0/trials/**/evaluation.json")}
    assert len(evaluated) == 4  # the pilot's, both rung records, the promoted trial's full budget

    trained = {p: p.stat().st_mtime_ns for p in out.glob("seed0/trials/**/metrics.json")}
    decided = (out / "seed0" / "random" / "round1" / "rung0" / "promoted.tsv").read_text()
    run_workflow(tmp_path, configfile, "-R", "evaluate_trial")
    # Every record scored again, on the adapter its rung kept: the same promotion, nothing trains.
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed0/trials/**/metrics.json")} == trained
    assert all(p.stat().st_mtime_ns > mtime for p, mtime in evaluated.items())
    assert (out / "seed0" / "random" / "round1" / "rung0" / "promoted.tsv").read_text() == decided
    rungs = [json.loads(p.read_text()) for p in out.glob("seed0/trials/*/step2/evaluation.json")]
    assert len(rungs) == 2 and all(r["status"] == "ok" for r in rungs)

    # A lost evaluation of the stopped trial is found at the start and redone, training nothing.
    (trial_dir / "step2" / "evaluation.json").unlink()
    run_workflow(tmp_path, configfile)
    assert json.loads((trial_dir / "step2" / "evaluation.json").read_text())["status"] == "ok"
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed0/trials/**/metrics.json")} == trained
    assert pd.read_csv(out / "trials.tsv", sep="\t")[OBJECTIVE].notna().all()

"""The pure round step: the workflow's propose job and the benchmarks get the same proposals,
and trials stopped at a rung are taken points, fitted only as STOPPED_FIT says."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import STUDY_SPACE
from loratune.benchmarks import evaluate
from loratune.config import Arm, validate_config
from loratune.designs import pilot_design
from loratune.ledger import read_table, write_table
from loratune.loop import next_proposals, propose_round
from loratune.proposers.base import fitting_history
from loratune.space import SearchSpace

OBJECTIVES = {"train_loss": "min", "train_time": "min"}


def history_of(space, points, status="ok"):
    rows = [{**p, **evaluate("zdt1", space, p, OBJECTIVES), "status": status} for p in points]
    return pd.DataFrame(rows)


def test_the_workflow_step_proposes_what_the_pure_step_does(tmp_path):
    config = {
        "backend": "benchmark",
        "benchmark": {"problem": "zdt1"},
        "objectives": OBJECTIVES,
        "search_space": STUDY_SPACE,
        "arms": {"tpe": {"proposer": "optuna", "options": {"sampler": "tpe"}, "batch_size": 3}},
    }
    study = validate_config(config)
    history = history_of(study.space, pilot_design(study.space, 6, "lhs", 4)).assign(
        seed=4, arm="pilot", round=0, trial_id=lambda df: [study.space.trial_id(p) for p in df.to_dict("records")]
    )
    write_table(history, tmp_path / "history.tsv")
    frame = propose_round(study, "tpe", 4, 1, tmp_path / "history.tsv", tmp_path / "proposals.tsv")
    pure = next_proposals(study.space, study.objectives, study.arm("tpe"), read_table(tmp_path / "history.tsv"), 4, 1)
    assert frame["trial_id"].tolist() == [study.space.trial_id(p) for p in pure]
    assert len(pure) == 3
    # Another round or seed is another proposer seed.
    other = next_proposals(study.space, study.objectives, study.arm("tpe"), history, 4, 2)
    assert [study.space.key(p) for p in other] != [study.space.key(p) for p in pure]


@pytest.mark.parametrize("stopped", ["full_budget", "highest_rung"])
def test_stopped_trials_are_never_proposed_again(stopped):
    space = SearchSpace.from_config(
        {"lora_rank": {"type": "choice", "values": [4, 8, 16]}, "lora_alpha": {"type": "choice", "values": [4, 8]}}
    )
    taken = [{"lora_rank": r, "lora_alpha": a} for r in (4, 8, 16) for a in (4, 8)][:5]
    history = pd.concat([history_of(space, taken[:2]), history_of(space, taken[2:], status="stopped")])
    arm = Arm("r", "random", 1, 1, {})
    [point] = next_proposals(space, OBJECTIVES, arm, history, 0, 1, stopped=stopped)
    assert point == {"lora_rank": 16, "lora_alpha": 8}


def test_fitting_history_decides_whether_stopped_rows_are_results():
    history = pd.DataFrame({"x": [1, 2, 3], "status": ["ok", "stopped", "failed"]})
    assert fitting_history(history, "highest_rung")["status"].tolist() == ["ok", "ok", "failed"]
    assert fitting_history(history, "full_budget")["status"].tolist() == ["ok", "stopped", "failed"]
    with pytest.raises(ValueError, match="stopped: must be one of"):
        fitting_history(history, "rung_as_input")


def test_a_stopped_trial_is_recorded_at_its_rung_and_counts_in_the_pareto_set(tmp_path):
    """update_history marks the round's trials with the rung they reached; aggregate puts a
    stopped trial on the Pareto set at its rung's values, and the summary says it stopped."""
    from loratune.loop import aggregate, summary_text, update_history

    study = validate_config(
        {
            "backend": "benchmark",
            "benchmark": {"problem": "zdt1"},
            "objectives": OBJECTIVES,
            "search_space": STUDY_SPACE,
            "training": {"max_steps": 60},
            "arms": {
                "es": {"proposer": "random", "batch_size": 3, "early_stopping": {"rungs": [0.5, 1.0], "keep": 0.5}}
            },
        }
    )
    points = pilot_design(study.space, 4, "lhs", 0)
    ids = [study.space.trial_id(p) for p in points]
    rows = [{"seed": 0, "round": 0, "trial_id": t, **p} for t, p in zip(ids, points)]
    write_table(
        pd.DataFrame([{**r, "arm": "pilot"} for r in rows[:1]])[
            ["seed", "arm", "round", "trial_id", *study.space.names]
        ],
        tmp_path / "pilot.tsv",
    )
    proposals = pd.DataFrame([{**r, "arm": "es", "round": 1} for r in rows[1:]])[
        ["seed", "arm", "round", "trial_id", *study.space.names]
    ]
    write_table(proposals, tmp_path / "proposals.tsv")
    # Pilot trial: full budget. Round 1: ids[1] stopped at step 30 with the lowest loss and time,
    # ids[2] promoted and trained to 60, ids[3] failed at the rung.
    values = {
        ids[0]: {"train_loss": 1.0, "train_time": 30.0, "steps": 60, "status": "ok"},
        ids[1]: {"train_loss": 0.5, "train_time": 10.0, "steps": 30, "status": "ok"},
        ids[2]: {"train_loss": 2.0, "train_time": 5.0, "steps": 60, "status": "ok"},
        ids[3]: {"status": "failed", "steps": 12},
    }
    paths = {}
    for trial_id, metrics in values.items():
        paths[trial_id] = tmp_path / trial_id / "metrics.json"
        paths[trial_id].parent.mkdir()
        paths[trial_id].write_text(json.dumps({"trial_id": trial_id, "max_steps": 60, **metrics}))
    promoted = pd.DataFrame(
        {"trial_id": ids[1:], "rung": [0, 0, 0], "step": [30, 30, 30], "promoted": [False, True, False]}
    )
    write_table(promoted, tmp_path / "promoted.tsv")
    pilot = update_history(None, tmp_path / "pilot.tsv", [paths[ids[0]]], tmp_path / "pilot_history.tsv")
    assert "rung" not in pilot.columns  # the pilot has no rungs
    history = update_history(
        tmp_path / "pilot_history.tsv",
        tmp_path / "proposals.tsv",
        [paths[t] for t in ids[1:]],
        tmp_path / "history.tsv",
        outcomes_path=tmp_path / "promoted.tsv",
    )
    own = history[history["round"] == 1].set_index("trial_id")
    assert own["status"].tolist() == ["stopped", "ok", "failed"]
    assert own["rung"].tolist() == [0, 1, 0] and own["steps"].tolist() == [30, 60, 12]

    trials = aggregate(
        study, [tmp_path / "history.tsv"], tmp_path / "trials.tsv", tmp_path / "hv.tsv", tmp_path / "pareto.tsv"
    )
    front = read_table(tmp_path / "pareto.tsv")
    assert front["trial_id"].tolist() == [ids[1], ids[2]]
    assert front.set_index("trial_id").loc[ids[1], "status"] == "stopped"
    assert len(trials) == 4
    text = summary_text(study, front, tmp_path / "report.html")
    assert "stopped" in text and "steps" in text
    assert "steps" not in summary_text(study, front[front["status"] == "ok"], tmp_path / "report.html")

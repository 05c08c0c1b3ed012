"""The pure round step: the workflow's propose job and the benchmarks get the same proposals,
and trials stopped at a rung are taken points, fitted only as STOPPED_FIT says."""

from __future__ import annotations

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

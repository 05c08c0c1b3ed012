"""fANOVA importance on functions whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from loratune.designs import pilot_design
from loratune.importance import IMPORTANCE_COLUMNS, UPDATE_SCALE, importance_table
from loratune.space import SearchSpace
from conftest import STUDY_SPACE

SPACE = SearchSpace.from_config(STUDY_SPACE)
OBJECTIVES = {"eval_loss": "min", "train_time": "min"}


def trials_of(space: SearchSpace, n: int, seed: int = 0) -> pd.DataFrame:
    points = pilot_design(space, n, "lhs", seed)
    frame = pd.DataFrame(points)
    frame.insert(0, "trial_id", [space.trial_id(p) for p in points])
    frame.insert(0, "seed", 0)
    frame["status"] = "ok"
    return frame


def importance_of(table: pd.DataFrame, objective: str, column: str = "importance") -> pd.Series:
    rows = table[table["objective"] == objective]
    return rows.set_index("parameter")[column]


def test_the_one_parameter_an_objective_depends_on_ranks_first_by_far():
    trials = trials_of(SPACE, 24)
    noise = np.random.default_rng(1).normal(size=len(trials))
    # eval_loss depends only on the learning rate, train_time only on the (choice) alpha.
    trials["eval_loss"] = (np.log10(trials["learning_rate"]) + 3.5) ** 2 + 0.01 * noise
    trials["train_time"] = np.log2(trials["lora_alpha"]) + 0.01 * noise
    table = importance_table(trials, SPACE, OBJECTIVES)

    assert list(table.columns) == IMPORTANCE_COLUMNS
    assert set(table["parameter"]) == {*SPACE.tunable_names, UPDATE_SCALE}
    for objective, expected in [("eval_loss", "learning_rate"), ("train_time", "lora_alpha")]:
        shares = importance_of(table, objective).drop(UPDATE_SCALE)
        assert shares.sum() == pytest.approx(1.0)
        ranked = shares.sort_values(ascending=False)
        assert ranked.index[0] == expected
        assert ranked.iloc[0] > 0.6 and ranked.iloc[0] > 4 * ranked.iloc[1], ranked
        rows = table[table["objective"] == objective].set_index("parameter")
        assert rows.loc[expected, "rank"] == 1 and np.isnan(rows.loc[UPDATE_SCALE, "rank"])
    assert (table["n_trials"] == 24).all()


def test_a_loss_of_the_update_scale_gives_the_derived_column_the_largest_share():
    trials = trials_of(SPACE, 40, seed=3)
    scale = np.log(trials["learning_rate"] * trials["lora_alpha"] / trials["lora_rank"])
    trials["eval_loss"] = (scale + 6.0) ** 2
    trials["train_time"] = trials["lora_rank"].astype(float)
    table = importance_table(trials, SPACE, OBJECTIVES)

    with_scale = importance_of(table, "eval_loss", "importance_with_update_scale")
    assert with_scale.idxmax() == UPDATE_SCALE and with_scale.sum() == pytest.approx(1.0)
    # The fit over the tuned parameters alone leaves the derived row empty.
    assert np.isnan(importance_of(table, "eval_loss")[UPDATE_SCALE])
    assert importance_of(table, "train_time").drop(UPDATE_SCALE).idxmax() == "lora_rank"


def test_only_ok_trials_with_values_count_and_too_few_give_nan():
    trials = trials_of(SPACE, 12)
    trials["eval_loss"] = np.log10(trials["learning_rate"])
    trials["train_time"] = trials["lora_rank"].astype(float)
    trials.loc[:2, "status"] = "failed"
    trials.loc[:2, "eval_loss"] = np.nan
    trials.loc[3:4, "status"] = "stopped"
    trials.loc[5, "train_time"] = np.nan
    # A trial two arms share is one observation.
    trials = pd.concat([trials, trials.iloc[[6]]], ignore_index=True)
    table = importance_table(trials, SPACE, OBJECTIVES)
    counts = table.groupby("objective")["n_trials"].first()
    assert counts["eval_loss"] == 7 and counts["train_time"] == 6

    few = importance_table(trials.iloc[:5], SPACE, OBJECTIVES)
    assert few["importance"].isna().all() and few["rank"].isna().all()


def test_without_lr_alpha_and_rank_there_is_no_update_scale_row():
    space = SearchSpace.from_config(
        {
            "lora_rank": {"type": "int", "low": 4, "high": 64, "step": 4},
            "lora_dropout": {"type": "float", "low": 0.0, "high": 0.3},
        }
    )
    trials = trials_of(space, 16)
    trials["eval_loss"] = trials["lora_dropout"] ** 2
    trials["train_time"] = trials["lora_rank"].astype(float)
    table = importance_table(trials, space, OBJECTIVES)
    assert set(table["parameter"]) == {"lora_rank", "lora_dropout"}
    assert table["importance_with_update_scale"].isna().all()
    assert importance_of(table, "eval_loss").idxmax() == "lora_dropout"


def test_a_table_without_a_parameter_column_names_it():
    trials = trials_of(SPACE, 8).drop(columns="lora_alpha").assign(eval_loss=1.0, train_time=1.0)
    with pytest.raises(ValueError, match=r"importance's trials table: lacks column\(s\) \['lora_alpha'\]"):
        importance_table(trials, SPACE, OBJECTIVES)

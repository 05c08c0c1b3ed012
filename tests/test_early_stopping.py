"""Successive halving's rules: rung schedules, non-dominated fronts, crowding and promotion."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from loratune.early_stopping import (
    EarlyStopping,
    crowding_distance,
    multi_fidelity_final,
    non_dominated_fronts,
    predict_final,
    promotion,
    update_scale,
)

TWO = {"loss": "min", "cost": "min"}


def rung_results(rows):
    return pd.DataFrame([{"trial_id": t, "status": s, "loss": loss, "cost": cost} for t, s, loss, cost in rows])


# A hand-made rung: A, B, C, D are front 0; E and F front 1 (B dominates E, C dominates F); G
# front 2; H failed. In front 0 (f1 range 5, f2 range 4) the extremes A and D are infinitely
# crowded, B = (3-1)/5 + (5-2)/4 = 1.15 and C = (6-2)/5 + (3-1)/4 = 1.3.
KNOWN = [
    ("A", "ok", 1.0, 5.0),
    ("B", "ok", 2.0, 3.0),
    ("C", "ok", 3.0, 2.0),
    ("D", "ok", 6.0, 1.0),
    ("E", "ok", 3.0, 4.0),
    ("F", "ok", 4.0, 3.0),
    ("G", "ok", 7.0, 7.0),
    ("H", "failed", None, None),
]


def test_fronts_and_crowding_of_a_known_rung():
    table = promotion(rung_results(KNOWN), TWO, n_keep=3)
    assert table["front"].tolist()[:7] == [0, 0, 0, 0, 1, 1, 2]
    assert math.isnan(table["front"].iloc[7])
    front0 = table["crowding"].iloc[:4].tolist()
    assert front0[0] == math.inf and front0[3] == math.inf
    assert front0[1] == pytest.approx(1.15) and front0[2] == pytest.approx(1.3)


@pytest.mark.parametrize(
    "n_keep, expected",
    [
        (1, {"A"}),  # A and D tie at infinity: the earlier row
        (2, {"A", "D"}),
        (3, {"A", "D", "C"}),  # C is less crowded than B
        (4, {"A", "B", "C", "D"}),
        (5, {"A", "B", "C", "D", "E"}),  # E and F tie (both extremes of front 1): the earlier row
        (7, {"A", "B", "C", "D", "E", "F", "G"}),
        (8, {"A", "B", "C", "D", "E", "F", "G"}),  # the failed trial never goes on
    ],
)
def test_promotion_keeps_whole_fronts_then_the_most_spread(n_keep, expected):
    table = promotion(rung_results(KNOWN), TWO, n_keep=n_keep)
    assert set(table.loc[table["promoted"], "trial_id"]) == expected


def test_a_diverged_trial_stops_at_once_even_with_status_ok():
    rows = [("A", "ok", float("nan"), 1.0), ("B", "ok", 2.0, 2.0), ("C", "diverged", 0.1, 0.1)]
    table = promotion(rung_results(rows), TWO, n_keep=2)
    assert table["promoted"].tolist() == [False, True, False]


def test_one_objective_promotes_the_lowest_values_with_ties_by_row_order():
    rows = [("A", "ok", 3.0, 0), ("B", "ok", 1.0, 0), ("C", "ok", 2.0, 0), ("D", "ok", 1.0, 0)]
    table = promotion(rung_results(rows), {"loss": "min"}, n_keep=2)
    assert table.loc[table["promoted"], "trial_id"].tolist() == ["B", "D"]
    table = promotion(rung_results(rows), {"loss": "min"}, n_keep=1)
    assert table.loc[table["promoted"], "trial_id"].tolist() == ["B"]
    assert table["front"].tolist() == [2, 0, 1, 0]


def test_max_objectives_are_compared_negated():
    rows = [("A", "ok", 1.0, 10.0), ("B", "ok", 1.0, 20.0)]
    table = promotion(rung_results(rows), {"loss": "min", "cost": "max"}, n_keep=1)
    assert table.loc[table["promoted"], "trial_id"].tolist() == ["B"]


def test_crowding_of_equal_points_and_small_sets():
    assert crowding_distance(np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])).tolist() == [0.0, 0.0, 0.0]
    assert crowding_distance(np.array([[1.0, 2.0], [2.0, 1.0]])).tolist() == [math.inf, math.inf]
    fronts = non_dominated_fronts(np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [np.nan, 0.0]]))
    assert [f.tolist() for f in fronts] == [[0, 1], [2]]


def test_rung_steps_and_keep_counts():
    schedule = EarlyStopping.from_config({"rungs": [0.111, 0.333, 1.0], "keep": 0.334})
    assert schedule.rung_steps(90) == [10, 30, 90]
    assert [schedule.n_keep(n) for n in (9, 3, 1, 0)] == [3, 1, 1, 0]
    assert EarlyStopping.from_config({"rungs": [1.0], "keep": 0.5}).rung_steps(7) == [7]
    with pytest.raises(ValueError, match=r"^early_stopping.rungs: .* same step"):
        schedule.rung_steps(4)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"rungs": [0.5, 0.25, 1.0], "keep": 0.5}, r"^arms.a.early_stopping.rungs: must increase"),
        ({"rungs": [0.25, 0.5], "keep": 0.5}, r"^arms.a.early_stopping.rungs: the last rung must be 1.0"),
        ({"rungs": [0.0, 1.0], "keep": 0.5}, r"^arms.a.early_stopping.rungs: every rung must be a fraction"),
        ({"rungs": [0.5, 1.5], "keep": 0.5}, r"^arms.a.early_stopping.rungs: every rung must be a fraction"),
        ({"rungs": [], "keep": 0.5}, r"^arms.a.early_stopping.rungs: must be a non-empty list"),
        ({"rungs": [0.5, 1.0], "keep": 1.0}, r"^arms.a.early_stopping.keep: must be a fraction in \(0, 1\)"),
        ({"rungs": [0.5, 1.0], "keep": 0.5, "eta": 3}, r"^arms.a.early_stopping: unknown setting"),
    ],
)
def test_bad_schedules_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        EarlyStopping.from_config(spec, field="arms.a.early_stopping")


def test_hypervolume_curves_add_up_the_cost_of_every_trial_stopped_ones_included():
    from loratune.pareto import hypervolume_curves

    rows = [
        (0, "pilot", 0, "p0", 0.5, 0.5, "ok", 10.0, 100),
        (0, "pilot", 0, "p1", 0.2, 0.9, "ok", 12.0, 100),
        (0, "es", 1, "s1", 0.9, 0.1, "stopped", 1.5, 10),  # stopped at a rung: its cost and its volume
        (0, "es", 1, "f1", None, None, "failed", None, None),  # failed before recording any cost
        (0, "es", 1, "o1", 0.1, 0.1, "ok", 11.0, 100),
    ]
    columns = ["seed", "arm", "round", "trial_id", "loss", "cost", "status", "train_seconds", "steps"]
    curves = hypervolume_curves(pd.DataFrame(rows, columns=columns), TWO)
    es = curves[curves.arm == "es"]
    assert es["train_seconds"].tolist() == [10.0, 22.0, 23.5, 23.5, 34.5]
    assert es["train_steps"].tolist() == [100, 200, 210, 210, 310]
    # The stopped trial is a result at its rung's values: it adds volume (a failed one adds none).
    assert (
        es["hypervolume"].iloc[1] < es["hypervolume"].iloc[2] == es["hypervolume"].iloc[3] < es["hypervolume"].iloc[4]
    )
    bare = hypervolume_curves(pd.DataFrame(rows, columns=columns).drop(columns=["train_seconds", "steps"]), TWO)
    assert bare["train_seconds"].isna().all() and bare["hypervolume"].tolist() == curves["hypervolume"].tolist()


def test_arm_schedules_are_checked_with_the_config():
    from conftest import STUDY_SPACE
    from loratune.config import ConfigError, validate_config

    def config(early_stopping, **training):
        return {
            "backend": "benchmark",
            "benchmark": {"problem": "lora_surrogate"},
            "objectives": {"eval_loss": "min"},
            "search_space": STUDY_SPACE,
            "training": training,
            "arms": {"es": {"proposer": "random", "batch_size": 9, "early_stopping": early_stopping}},
        }

    study = validate_config(config({"rungs": [0.111, 0.333, 1.0], "keep": 0.334}, max_steps=90))
    assert study.rung_steps("es") == [10, 30, 90] and study.arm("es").early_stopping.n_keep(9) == 3
    assert validate_config(config(None)).arm("es").early_stopping is None
    with pytest.raises(ConfigError, match=r"^arms.es.early_stopping.rungs: the last rung must be 1.0"):
        validate_config(config({"rungs": [0.5], "keep": 0.5}))
    with pytest.raises(ConfigError, match=r"^arms.es.early_stopping.rungs: .* same step"):
        validate_config(config({"rungs": [0.1, 0.2, 1.0], "keep": 0.5}, max_steps=5))
    with pytest.raises(ConfigError, match=r"^arms.es.early_stopping: rungs are fractions of training.max_steps"):
        validate_config(config({"rungs": [0.5, 1.0], "keep": 0.5}, max_steps=None))
    with pytest.raises(ConfigError, match=r"^arms.es.early_stopping.promote: 'predicted' is measured by bench"):
        validate_config(config({"rungs": [0.5, 1.0], "keep": 0.5, "promote": "predicted"}, max_steps=90))


def test_successive_halving_in_one_process_trains_each_rung_once():
    from loratune.early_stopping import successive_halving

    final_loss = {"a": 1.0, "b": 0.5, "c": 2.0, "d": 0.7}
    calls = []

    def train(trial_id, step):
        calls.append((trial_id, step))
        if trial_id == "c":
            return {"status": "failed", "loss": None, "cost": None}
        return {"status": "ok", "loss": final_loss[trial_id] + 10 / step, "cost": 1.0}

    schedule = EarlyStopping.from_config({"rungs": [0.25, 0.5, 1.0], "keep": 0.5})
    outcome = successive_halving(["a", "b", "c", "d"], schedule, 40, {"loss": "min"}, train)
    assert calls == [("a", 10), ("b", 10), ("c", 10), ("d", 10), ("b", 20), ("d", 20), ("b", 40)]
    assert {t: r["status"] for t, r in outcome.items()} == {"a": "stopped", "b": "ok", "c": "failed", "d": "stopped"}
    assert outcome["d"]["loss"] == 0.7 + 10 / 20  # its highest rung


def test_a_rung_of_a_trial_another_arm_trained_fully_leaves_that_trial_folder_alone(tmp_path):
    """The trial folder keeps the full run's adapter and metrics: a later rung job of the same
    trial (another arm's successive halving) trains in its own step folder instead."""
    import json

    from conftest import load_test_config
    from loratune.config import validate_config
    from loratune.trial import TRIAL_LOCK, run_trial_job

    study = validate_config(load_test_config("tiny_rungs.yaml"))
    trial_id = study.space.trial_id(study.space.snap({"lora_rank": 64, "lora_alpha": 16, "learning_rate": 1e-3}))
    folder = tmp_path / trial_id
    rung = run_trial_job(study, trial_id, 0, folder / "step10" / "metrics.json", until_step=10, trial_dir=folder)
    assert rung["steps"] == 10 and (folder / TRIAL_LOCK).exists() and not (folder / "step10" / TRIAL_LOCK).exists()
    full = run_trial_job(study, trial_id, 0, folder / "metrics.json")
    assert full["status"] == "ok" and full["steps"] == 40
    before = (folder / "metrics.json").read_text()
    again = run_trial_job(study, trial_id, 0, folder / "step20" / "metrics.json", until_step=20, trial_dir=folder)
    assert again["steps"] == 20 and (folder / "step20" / TRIAL_LOCK).exists()
    assert (folder / "metrics.json").read_text() == before and json.loads(before)["steps"] == 40


# A rung where the two promotion rules part: A, B, D are front 0, E, F, G dominated. The rung's
# scale (front's best to the larger of its worst and the rung's median: loss 1..5.5, cost
# 0.9..4.5) puts B at (0.11, 0.03): it alone dominates most of the box. D is the cost extreme
# at a loss near the median: crowding promotes it (infinitely crowded), the hypervolume rule
# would rather have A (it adds 0.057 to B's volume, D 0.006).
PARTING = [
    ("A", "ok", 1.0, 3.0),
    ("B", "ok", 1.5, 1.0),
    ("D", "ok", 5.0, 0.9),
    ("E", "ok", 6.0, 6.0),
    ("F", "ok", 7.0, 7.0),
    ("G", "ok", 8.0, 8.0),
]


@pytest.mark.parametrize(
    "promote, n_keep, expected",
    [
        ("crowding", 2, ["A", "D"]),
        ("hypervolume", 1, ["B"]),
        ("hypervolume", 2, ["A", "B"]),
        ("hypervolume", 3, ["A", "B", "D"]),
        # E..G add nothing (dominated): the places left go by front, then crowding (E first).
        ("hypervolume", 4, ["A", "B", "D", "E"]),
    ],
)
def test_hypervolume_promotion_takes_the_largest_contributions_first(promote, n_keep, expected):
    table = promotion(rung_results(PARTING), TWO, n_keep=n_keep, promote=promote)
    assert table.loc[table["promoted"], "trial_id"].tolist() == expected
    assert table["front"].tolist() == [0, 0, 0, 1, 2, 3]


def test_hypervolume_promotion_skips_failed_trials_and_names_bad_rules():
    rows = [("A", "failed", None, None), ("B", "ok", 2.0, 2.0), ("C", "ok", 1.0, 3.0)]
    table = promotion(rung_results(rows), TWO, n_keep=3, promote="hypervolume")
    assert table["promoted"].tolist() == [False, True, True]
    with pytest.raises(
        ValueError,
        match=r"^arms.a.early_stopping.promote: must be one of \['crowding', 'hypervolume', 'predicted', 'multi_fidelity'\]",
    ):
        EarlyStopping.from_config({"rungs": [0.5, 1.0], "keep": 0.5, "promote": "best"}, field="arms.a.early_stopping")
    assert EarlyStopping.from_config({"rungs": [0.5, 1.0], "keep": 0.5}).promote == "crowding"


def test_successive_halving_promotes_by_the_schedules_rule():
    from loratune.early_stopping import successive_halving

    values = {t: (loss, cost) for t, _, loss, cost in PARTING}
    outcome = successive_halving(
        list(values),
        EarlyStopping.from_config({"rungs": [0.5, 1.0], "keep": 0.34, "promote": "hypervolume"}),
        10,
        TWO,
        lambda trial_id, step: {"status": "ok", "loss": values[trial_id][0], "cost": values[trial_id][1]},
    )
    assert [t for t, m in outcome.items() if m["status"] == "ok"] == ["A", "B"]


def _run(rank, alpha, lr, losses):
    """A complete reference run: its parameters and a curve evaluated every 10 steps."""
    return {
        "lora_rank": rank,
        "lora_alpha": alpha,
        "learning_rate": lr,
        "curve": [{"step": 10 * (i + 1), "loss": v, "train_time": float(i)} for i, v in enumerate(losses)],
    }


# Reference curves whose answer is known: small updates (lr * alpha / rank = 1e-4) start slowly
# and gain 0.3 after step 20; large ones (1e-1) are at their best by step 20 and then overfit.
SLOW = [_run(8, 8, 1e-4, [3.0, 2.9, 2.7, 2.6]), _run(16, 16, 1e-4, [3.1, 3.0, 2.8, 2.7])]
FAST = [_run(8, 8, 1e-1, [2.7, 2.6, 2.8, 2.9]), _run(16, 32, 5e-2, [2.8, 2.7, 2.9, 3.0])]


def test_update_scale_is_the_log_of_lr_times_alpha_over_rank():
    assert update_scale({"learning_rate": 1e-3, "lora_alpha": 32, "lora_rank": 8}) == pytest.approx(math.log(4e-3))
    assert math.isnan(update_scale({"learning_rate": 1e-3, "lora_rank": 8}))


def test_predict_final_adds_the_gain_of_the_nearest_curves_in_update_scale():
    points = [
        {"lora_rank": 4, "lora_alpha": 4, "learning_rate": 1e-4},
        {"lora_rank": 4, "lora_alpha": 8, "learning_rate": 5e-2},
    ]
    # Up to step 20 the slow runs' best is 2.9 and 3.0, their final best 0.3 lower; the fast
    # runs' best is already final (gain 0). With one neighbour each point takes its own kind.
    predicted = predict_final(points, [3.0, 2.5], 20, SLOW + FAST, "loss", neighbours=1)
    assert predicted == pytest.approx([2.7, 2.5])
    # Two neighbours of the slow point are the two slow runs: the median of -0.3 and -0.3.
    assert predict_final(points[:1], [3.0], 20, SLOW + FAST, "loss", neighbours=2) == pytest.approx([2.7])
    # A "max" objective gains upwards; no reference leaves the values as they are.
    flipped = [{**run, "curve": [{**r, "loss": -r["loss"]} for r in run["curve"]]} for run in SLOW]
    assert predict_final(points[:1], [-3.0], 20, flipped, "loss", "max", neighbours=1) == pytest.approx([-2.7])
    assert predict_final(points, [3.0, 2.5], 20, [], "loss").tolist() == [3.0, 2.5]
    # A point without the three parameters takes the median gain of every reference run.
    assert predict_final([{}], [3.0], 20, SLOW + FAST, "loss") == pytest.approx([2.85])


def test_predicted_promotion_ranks_slow_starters_by_their_final_value_and_costs_as_measured():
    # At step 20, S (a slow starter) is behind F (fast) by 0.1 but will gain 0.3; both cost the
    # same, so as measured F dominates S, and as predicted S dominates F.
    results = pd.DataFrame(
        [
            {
                "trial_id": "F",
                "status": "ok",
                "step": 20,
                "loss": 2.6,
                "cost": 5.0,
                "lora_rank": 8,
                "lora_alpha": 16,
                "learning_rate": 5e-2,
            },
            {
                "trial_id": "S",
                "status": "ok",
                "step": 20,
                "loss": 2.7,
                "cost": 5.0,
                "lora_rank": 8,
                "lora_alpha": 8,
                "learning_rate": 1e-4,
            },
            {
                "trial_id": "C",
                "status": "ok",
                "step": 20,
                "loss": 3.5,
                "cost": 1.0,
                "lora_rank": 8,
                "lora_alpha": 8,
                "learning_rate": 1e-4,
            },
        ]
    )
    measured = promotion(results, TWO, n_keep=2)
    assert measured.loc[measured["promoted"], "trial_id"].tolist() == ["F", "C"]
    predicted = promotion(results, TWO, n_keep=2, promote="predicted", reference=SLOW + FAST)
    assert predicted.loc[predicted["promoted"], "trial_id"].tolist() == ["S", "C"]
    assert predicted["predicted_loss"].tolist() == pytest.approx([2.6, 2.4, 3.2])
    assert "predicted_cost" not in predicted  # the cost is not on the curves: known, as measured
    assert predicted["loss"].tolist() == [2.6, 2.7, 3.5]  # the measured values stay in the table


PARAMETERS = ("lora_rank", "lora_alpha", "learning_rate")


def test_multi_fidelity_final_predicts_the_gain_of_complete_curves_like_each_trials():
    slow = {"lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-4}
    fast = {"lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-1}
    # At step 20 the slow runs' best is 0.3 above their final best, the fast runs' already final.
    predicted = multi_fidelity_final([slow, fast], [2.9, 2.6], [20, 20], SLOW + FAST, "loss", 40, PARAMETERS)
    assert predicted[0] < 2.9 - 0.15  # it will gain, as the slow curves did
    assert 2.6 - 0.05 < predicted[1] <= 2.6  # it has no gain left; a best so far never gets worse
    # At the full budget nothing is left to gain.
    assert multi_fidelity_final([slow], [2.6], [40], SLOW + FAST, "loss", 40, PARAMETERS) == pytest.approx([2.6])
    # A "max" objective gains upwards.
    flipped = [{**run, "curve": [{**r, "loss": -r["loss"]} for r in run["curve"]]} for run in SLOW + FAST]
    assert multi_fidelity_final([slow], [-2.9], [20], flipped, "loss", 40, PARAMETERS, "max")[0] > -2.9 + 0.15
    # Fewer than three evaluations to fit, or curves that end before the budget (no known gain):
    # the values as they are.
    assert multi_fidelity_final([slow], [2.9], [20], [], "loss", 40, PARAMETERS).tolist() == [2.9]
    assert multi_fidelity_final([slow], [2.9], [20], SLOW + FAST, "loss", 60, PARAMETERS).tolist() == [2.9]


def test_multi_fidelity_promotion_ranks_slow_starters_by_their_predicted_final_value():
    # F (fast) is ahead of S (a slow starter) at step 20 at the same cost; the curves say S will
    # gain and F will not, so predicted, S goes on; C (the cheapest) goes on either way.
    rows = [
        ("F", 2.6, 5.0, {"lora_rank": 8, "lora_alpha": 16, "learning_rate": 5e-2}),
        ("S", 2.7, 5.0, {"lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-4}),
        ("C", 3.5, 1.0, {"lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-4}),
    ]
    results = pd.DataFrame(
        [{"trial_id": t, "status": "ok", "step": 20, "loss": loss, "cost": cost, **p} for t, loss, cost, p in rows]
    )
    assert promotion(results, TWO, n_keep=2).query("promoted")["trial_id"].tolist() == ["F", "C"]
    decided = promotion(results, TWO, n_keep=2, promote="multi_fidelity", reference=SLOW + FAST)
    assert decided.query("promoted")["trial_id"].tolist() == ["S", "C"]
    assert decided["predicted_loss"].iloc[1] < decided["predicted_loss"].iloc[0]
    assert decided["loss"].tolist() == [2.6, 2.7, 3.5]  # the measured values stay in the table
    assert "predicted_cost" not in decided  # a cost that no curve records stays as measured


@pytest.mark.parametrize("rule", ["predicted", "multi_fidelity"])
def test_a_study_refuses_the_promotions_that_need_earlier_curves(rule):
    from conftest import STUDY_SPACE
    from loratune.config import ConfigError, validate_config

    spec = {"rungs": [0.5, 1.0], "keep": 0.5, "promote": rule}
    config = {
        "backend": "benchmark",
        "benchmark": {"problem": "zdt1"},
        "objectives": {"train_loss": "min", "train_time": "min"},
        "search_space": STUDY_SPACE,
        "training": {"max_steps": 60},
        "arms": {"es": {"proposer": "random", "batch_size": 3, "early_stopping": spec}},
    }
    with pytest.raises(ConfigError, match=rf"^arms.es.early_stopping.promote: '{rule}' is measured by bench"):
        validate_config(config)
    validate_config(
        {**config, "arms": {"es": {**config["arms"]["es"], "early_stopping": {**spec, "promote": "crowding"}}}}
    )

import itertools

import numpy as np
import pandas as pd
import pytest

from loratune.pareto import (
    ALL_ARMS,
    REFERENCE,
    arm_fronts,
    arms_in_order,
    best_subset_hypervolumes,
    distinct_trials,
    hypervolume,
    hypervolume_curves,
    non_dominated,
    normalization_bounds,
    normalize,
    pareto_front,
    to_minimization,
)

OBJECTIVES = {"train_loss": "min", "train_time": "min"}


def monte_carlo_hypervolume(Y, ref, lower, samples=200_000, seed=0):
    """The share of uniform samples in the box [lower, ref] that some point dominates."""
    rng = np.random.default_rng(seed)
    lower, ref = np.asarray(lower, float), np.asarray(ref, float)
    S = lower + rng.random((samples, len(ref))) * (ref - lower)
    dominated = np.zeros(samples, dtype=bool)
    for y in Y:
        dominated |= (S >= y).all(axis=1)
    share = dominated.mean()
    box = np.prod(ref - lower)
    return share * box, np.sqrt(share * (1 - share) / samples) * box


def test_to_minimization_negates_max_columns():
    Y = to_minimization([[1.0, 2.0], [3.0, -4.0]], ["min", "max"])
    assert Y.tolist() == [[1.0, -2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="objectives: sense"):
        to_minimization([[1.0]], ["minimize"])
    with pytest.raises(ValueError, match="objectives: 1 senses for 2"):
        to_minimization([[1.0, 2.0]], ["min"])


def test_non_dominated_hand_cases():
    Y = [[1, 2], [2, 1], [2, 2], [1, 2], [3, 0], [3, 3]]
    assert non_dominated(Y).tolist() == [True, True, False, True, True, False]
    # (1, 2) is better in the first column and, after the max column is negated, in the second.
    maximized = to_minimization([[1, 5], [2, 4], [0, 1]], ["min", "max"])
    assert non_dominated(maximized).tolist() == [True, False, True]
    assert non_dominated([[1, np.nan], [2, 2], [np.inf, 0]]).tolist() == [False, True, False]
    assert non_dominated([[5.0]]).tolist() == [True]


def test_pareto_front_uses_only_ok_finite_rows_and_sorts():
    df = pd.DataFrame(
        {
            "trial_id": list("abcdefg"),
            "train_loss": [1.0, 2.0, 0.5, 3.0, 0.1, np.nan, 1.0],
            "train_time": [30.0, 10.0, 50.0, 5.0, 1.0, 0.0, 30.0],
            "status": ["ok", "ok", "ok", "ok", "failed", "ok", "ok"],
        }
    )
    front = pareto_front(df, OBJECTIVES)
    assert front["trial_id"].tolist() == ["c", "a", "g", "b", "d"]
    without_status = pareto_front(df.drop(columns="status"), OBJECTIVES)
    assert without_status["trial_id"].tolist() == ["e"]
    throughput = pareto_front(df, {"train_loss": "min", "train_time": "max"})
    assert throughput["trial_id"].tolist() == ["c"]
    with pytest.raises(ValueError, match="objectives: \\['eval_loss'\\]"):
        pareto_front(df, {"eval_loss": "min"})


def test_hypervolume_two_objectives_by_hand():
    assert hypervolume([[1, 2], [2, 1]], [3, 3]) == pytest.approx(3.0)
    # Dominated, repeated and out-of-box points add nothing.
    assert hypervolume([[1, 2], [2, 1], [2, 2], [1, 2], [4, 0], [0, 3]], [3, 3]) == pytest.approx(3.0)
    assert hypervolume([[1, 3]], [3, 3]) == 0.0
    assert hypervolume(np.empty((0, 2)), [3, 3]) == 0.0
    assert hypervolume([[2.0]], [3.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference point has 3 values for 2"):
        hypervolume([[1, 2]], [3, 3, 3])


def test_hypervolume_of_boxes_by_inclusion_exclusion():
    # Two boxes in 3-D: 2*3*1 + 3*1*2 - overlap 2*1*1 = 10.
    assert hypervolume([[1, 0, 2], [0, 2, 1]], [3, 3, 3]) == pytest.approx(10.0)
    # Points on one plane: the 2-D volume times the depth.
    Y = np.array([[0.1, 0.7, 0.4], [0.5, 0.2, 0.4], [0.3, 0.3, 0.4]])
    assert hypervolume(Y, [1, 1, 1]) == pytest.approx(0.6 * hypervolume(Y[:, :2], [1, 1]))


@pytest.mark.parametrize("m, n", [(2, 40), (3, 40), (4, 25)])
def test_hypervolume_matches_monte_carlo(m, n):
    rng = np.random.default_rng(m)
    # Points near the sphere make a front of many non-dominated points.
    Y = np.abs(rng.normal(size=(n, m)))
    Y = Y / np.linalg.norm(Y, axis=1, keepdims=True) * rng.uniform(0.9, 1.3, size=(n, 1))
    ref = np.full(m, 1.2)
    exact = hypervolume(Y, ref)
    estimate, error = monte_carlo_hypervolume(Y, ref, lower=np.zeros(m))
    assert exact == pytest.approx(estimate, abs=4 * error)
    assert exact > 0


def test_normalization_bounds_and_normalize():
    df = pd.DataFrame(
        {
            "train_loss": [1.0, 2.0, 0.0, 1.5],
            "tokens_per_second": [100.0, 300.0, 500.0, 200.0],
            "status": ["ok", "ok", "failed", "ok"],
        }
    )
    objectives = {"train_loss": "min", "tokens_per_second": "max"}
    lower, upper = normalization_bounds(df, objectives)
    assert lower.tolist() == [1.0, -300.0] and upper.tolist() == [2.0, -100.0]
    Y = to_minimization(df[list(objectives)].to_numpy(), list(objectives.values()))
    assert normalize(Y, lower, upper)[:2].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert normalize([[3.0, 7.0]], [3.0, 7.0], [3.0, 7.0]).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="no trial with a result"):
        normalization_bounds(df.assign(status="failed"), objectives)


def _trials() -> pd.DataFrame:
    """Two seeds; a pilot of 3, a random arm and a gptune arm, listed out of round order."""
    rows = []
    for seed in (0, 1):
        shift = 0.1 * seed
        pilot = [(0.9, 0.5), (0.5, 0.9), (0.8, 0.8)]
        rows += [("pilot", 0, f"p{i}", *y, "ok") for i, y in enumerate(pilot)]
        rows += [
            ("gptune", 2, "g3", 0.2 + shift, 0.3, "ok"),
            ("random", 1, "r1", 0.95, 0.95, "ok"),
            ("gptune", 1, "g1", np.nan, np.nan, "failed"),
            ("gptune", 1, "g2", 0.4, 0.4 + shift, "ok"),
            ("random", 2, "r2", 0.6, 0.6, "ok"),
        ]
        rows = [(seed, *row) if len(row) == 6 else row for row in rows]
    df = pd.DataFrame(rows, columns=["seed", "arm", "round", "trial_id", "train_loss", "train_time", "status"])
    df["lora_rank"] = 16
    # An index that is not 0..n-1 must not matter.
    return df.set_index(np.arange(len(df)) * 7)


def test_hypervolume_curves_start_with_the_pilot_and_never_decrease():
    trials = _trials()
    curves = hypervolume_curves(trials, OBJECTIVES)
    assert list(curves.columns) == ["arm", "seed", "n_trials", "hypervolume", "train_seconds", "train_steps"]
    assert set(map(tuple, curves[["seed", "arm"]].drop_duplicates().to_numpy())) == {
        (s, a) for s in (0, 1) for a in ("pilot", "random", "gptune")
    }
    for (seed, arm), curve in curves.groupby(["seed", "arm"]):
        volumes = curve["hypervolume"].to_numpy()
        assert curve["n_trials"].tolist() == list(range(1, len(volumes) + 1))
        assert np.all(np.diff(volumes) >= 0)
        pilot = curves[(curves.seed == seed) & (curves.arm == "pilot")]["hypervolume"].to_numpy()
        assert len(volumes) == {"pilot": 3, "random": 5, "gptune": 6}[arm]
        assert np.array_equal(volumes[:3], pilot)
        assert 0 < volumes[-1] <= REFERENCE**2


def test_hypervolume_curves_follow_round_order_and_skip_failures():
    trials = _trials()
    curves = hypervolume_curves(trials, OBJECTIVES)
    lower, upper = normalization_bounds(trials, OBJECTIVES)
    seed0 = trials[trials.seed == 0]

    def volume(ids):
        rows = seed0.set_index("trial_id").loc[ids]
        Y = normalize(rows[list(OBJECTIVES)].to_numpy(), lower, upper)
        return hypervolume(Y, [REFERENCE, REFERENCE])

    pilot = ["p0", "p1", "p2"]
    gptune = curves[(curves.seed == 0) & (curves.arm == "gptune")]["hypervolume"].to_numpy()
    # Round 1 (failed g1, then g2) comes before round 2 (g3) whatever the table order.
    assert gptune[3] == pytest.approx(volume(pilot))
    assert gptune[4] == pytest.approx(volume(pilot + ["g2"]))
    assert gptune[5] == pytest.approx(volume(pilot + ["g2", "g3"]))
    assert gptune[5] > gptune[4] > gptune[3]
    random = curves[(curves.seed == 0) & (curves.arm == "random")]["hypervolume"].to_numpy()
    assert random[3] == pytest.approx(volume(pilot))  # r1 is dominated by the pilot
    # Bounds come from the whole table: the best loss (0.2 of seed 0) sits at 0.
    assert lower[0] == 0.2


def test_hypervolume_curves_accept_explicit_bounds_and_reference():
    trials = _trials()
    curves = hypervolume_curves(trials, OBJECTIVES, bounds=([0.0, 0.0], [1.0, 1.0]), ref=[1.0, 1.0])
    final = curves[(curves.seed == 0) & (curves.arm == "gptune")]["hypervolume"].iloc[-1]
    seed0 = trials[(trials.seed == 0) & (trials.status == "ok") & trials.arm.isin(["pilot", "gptune"])]
    assert final == pytest.approx(hypervolume(seed0[list(OBJECTIVES)].to_numpy(), [1.0, 1.0]))
    with pytest.raises(ValueError, match="lacks column"):
        hypervolume_curves(trials.drop(columns="round"), OBJECTIVES)
    failed = hypervolume_curves(trials.assign(status="failed"), OBJECTIVES)
    assert (failed["hypervolume"] == 0).all()


def test_arm_fronts_give_per_seed_the_study_front_then_pilot_and_pilot_plus_each_arm():
    trials = _trials()
    fronts = arm_fronts(trials, OBJECTIVES)
    assert arms_in_order(trials["arm"]) == ["pilot", "gptune", "random"]
    labels = [ALL_ARMS, "pilot", "pilot + gptune", "pilot + random"]
    assert list(fronts.drop_duplicates(["seed", "front"])[["seed", "front"]].itertuples(index=False)) == [
        (seed, label) for seed in (0, 1) for label in labels
    ]
    seed0 = fronts[fronts.seed == 0]
    members = {label: list(seed0[seed0.front == label]["trial_id"]) for label in labels}
    # Sorted by the first objective; g3 dominates every other trial, r2 only p2.
    assert members == {
        ALL_ARMS: ["g3"],
        "pilot": ["p1", "p2", "p0"],
        "pilot + gptune": ["g3"],
        "pilot + random": ["p1", "r2", "p0"],
    }
    # The front rows are the trials' rows: every column kept, plus ``front``.
    assert set(fronts.columns) == {*trials.columns, "front"}
    assert seed0.loc[seed0.trial_id == "g3", "train_loss"].tolist() == [0.2] * 2
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['status'\]"):
        arm_fronts(trials.drop(columns="status"), OBJECTIVES)


def test_arm_fronts_count_a_trial_two_arms_proposed_once_in_the_study_front():
    trials = _trials()
    shared = trials[(trials.seed == 0) & (trials.trial_id == "g3")].assign(arm="random", round=3)
    fronts = arm_fronts(pd.concat([trials, shared]), OBJECTIVES)
    seed0 = fronts[fronts.seed == 0]
    # Credited to its first row (gptune's); each arm's own front still has it.
    assert seed0.loc[seed0.front == ALL_ARMS, ["trial_id", "arm"]].values.tolist() == [["g3", "gptune"]]
    assert seed0.loc[seed0.front == "pilot + random", "trial_id"].tolist() == ["g3"]


def one_seed(*rows: str) -> pd.DataFrame:
    """Trials of seed 0 from "arm trial_id train_loss train_time status steps" (the pilot is round 0)."""
    records = []
    for row in rows:
        arm, trial_id, loss, time, status, steps = row.split()
        records.append((0, arm, 0 if arm == "pilot" else 1, trial_id, float(loss), float(time), status, int(steps)))
    return pd.DataFrame(records, columns=["seed", "arm", "round", "trial_id", *OBJECTIVES, "status", "steps"])


def test_a_stopped_trial_is_a_result_on_the_front_and_in_the_hypervolume():
    # s1 stopped at a rung with values no full-budget trial reaches on the time axis; f1 failed
    # with better numbers left behind, which must count for nothing.
    trials = one_seed(
        "pilot p0 1 30 ok 60",
        "pilot p1 2 10 ok 60",
        "es s1 1.5 4 stopped 10",
        "es f1 0.1 1 failed 10",
        "es s2 3 20 stopped 10",
    )
    assert pareto_front(trials, OBJECTIVES)["trial_id"].tolist() == ["p0", "s1"]
    fronts = arm_fronts(trials, OBJECTIVES)
    assert fronts.loc[fronts.front == ALL_ARMS, "trial_id"].tolist() == ["p0", "s1"]
    assert fronts.loc[fronts.front == "pilot", "trial_id"].tolist() == ["p0", "p1"]
    # Bounds span the results, the stopped ones included, not the failed one.
    lower, upper = normalization_bounds(trials, OBJECTIVES)
    assert lower.tolist() == [1.0, 4.0] and upper.tolist() == [3.0, 30.0]
    es = hypervolume_curves(trials, OBJECTIVES)
    es = es[es.arm == "es"]["hypervolume"].to_numpy()
    Y = normalize(trials[list(OBJECTIVES)].to_numpy(dtype=float), lower, upper)
    ref = [REFERENCE, REFERENCE]
    assert es[2] == pytest.approx(hypervolume(Y[[0, 1, 2]], ref)) and es[2] > es[1]
    assert es[3] == es[2] == es[4]  # neither the failed nor the dominated stopped trial adds volume


def test_distinct_trials_keep_the_row_that_trained_furthest():
    # t1: stopped at step 10 by one arm, trained to 60 by another; its full row is the one kept.
    trials = one_seed(
        "pilot p0 1 30 ok 60",
        "es t1 0.9 5 stopped 10",
        "random t1 0.5 20 ok 60",
        "random t2 2 1 ok 60",
        "es t2 2 1 ok 60",
    )
    kept = distinct_trials(trials)
    assert kept[["trial_id", "arm"]].values.tolist() == [["p0", "pilot"], ["t1", "random"], ["t2", "random"]]
    study = arm_fronts(trials, OBJECTIVES)
    assert study.loc[study.front == ALL_ARMS, ["trial_id", "arm"]].values.tolist() == [
        ["t1", "random"],
        ["t2", "random"],
    ]
    # The early-stopping arm's own front still has t1 at its rung.
    assert study.loc[study.front == "pilot + es", ["trial_id", "steps"]].values.tolist() == [["t1", 10], ["t2", 60]]
    assert distinct_trials(trials.drop(columns="steps"))["arm"].tolist() == ["pilot", "es", "random"]


def test_best_subset_hypervolumes_match_brute_force():
    rng = np.random.default_rng(7)
    ref = np.array([1.1, 1.1])
    points = rng.random((11, 2))
    # A dominated copy and a point outside the reference box must not change anything.
    points = np.vstack([points, points[0] + 0.05, [1.5, 0.0]])
    best = best_subset_hypervolumes(points, ref, 5)
    for k in range(1, 6):
        brute = max(hypervolume(points[list(c)], ref) for c in itertools.combinations(range(len(points)), k))
        assert best[k - 1] == pytest.approx(brute, rel=1e-12)
    assert np.all(np.diff(best) >= 0)
    assert best[-1] <= hypervolume(points, ref) + 1e-12


def test_best_subset_hypervolumes_of_a_quarter_circle_and_bad_input():
    angles = np.linspace(0, np.pi / 2, 401)
    circle = np.column_stack([np.cos(angles), np.sin(angles)])
    ref = [1.1, 1.1]
    best = best_subset_hypervolumes(circle, ref, 3) / hypervolume(circle, ref)
    # One point at 45 degrees: (1.1 - 0.7071)^2 of the front's 1.21 - pi/4.
    assert best[0] == pytest.approx((1.1 - np.sqrt(0.5)) ** 2 / (1.21 - np.pi / 4), rel=5e-3)
    assert 0.69 < best[2] < 0.70
    assert np.all(best_subset_hypervolumes(np.array([[2.0, 2.0]]), ref, 2) == 0)
    with pytest.raises(ValueError, match="two objectives"):
        best_subset_hypervolumes(np.ones((3, 3)), [1.1] * 3, 2)
    with pytest.raises(ValueError, match="k_max"):
        best_subset_hypervolumes(circle, ref, 0)

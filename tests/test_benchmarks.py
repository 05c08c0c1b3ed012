import math

import numpy as np
import pytest

from loratune.benchmarks import PROBLEMS, SimulatedOutOfMemory, evaluate, reference_point, true_front
from loratune.designs import pilot_design
from loratune.pareto import hypervolume, non_dominated
from loratune.space import SearchSpace

STUDY = {
    "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4},
    "lora_alpha": {"type": "choice", "values": [4, 8, 16, 32, 64, 128, 256]},
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    "lora_dropout": {"type": "fixed", "value": 0.05},
}
TWO = {"train_loss": "min", "train_time": "min"}
THREE = {"train_loss": "min", "train_time": "min", "peak_memory_gib": "min"}
SURROGATE_METRICS = {
    "train_loss",
    "final_train_loss",
    "eval_loss",
    "train_time",
    "peak_memory_gib",
    "trainable_params",
    "tokens_per_second",
}


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.from_config(STUDY)


@pytest.fixture
def sample(space):
    return pilot_design(space, 300, "random", seed=11)


def point(rank, alpha, lr):
    return {"lora_rank": rank, "lora_alpha": alpha, "learning_rate": lr}


def test_registry_and_unknown_problem(space):
    assert {"zdt1", "zdt2", "dtlz2", "lora_surrogate"} <= set(PROBLEMS)
    with pytest.raises(ValueError, match=r"benchmark\.problem: unknown 'zdt7'"):
        evaluate("zdt7", space, point(8, 16, 1e-3), TWO)
    with pytest.raises(ValueError, match=r"benchmark\.noise"):
        evaluate("zdt1", space, point(8, 16, 1e-3), TWO, noise=-0.1)


def test_zdt1_reads_the_unit_encoding_of_the_space(space):
    # Rank 4, alpha 4, lr 1e-5 is the origin of the unit cube: f = (0, 1), on the front.
    assert evaluate("zdt1", space, point(4, 4, 1e-5), TWO) == {"train_loss": 0.0, "train_time": 1.0}
    assert evaluate("zdt1", space, point(256, 4, 1e-5), TWO) == {"train_loss": 1.0, "train_time": 0.0}
    # Off the front, g = 1 + 9 * mean(alpha, lr units) = 1 + 9 * 0.5.
    values = evaluate("zdt1", space, point(256, 256, 1e-5), TWO)
    assert values["train_time"] == pytest.approx(5.5 * (1 - math.sqrt(1 / 5.5)))
    # A rank off its step is snapped before it is encoded.
    assert evaluate("zdt1", space, point(130, 4, 1e-5), TWO)["train_loss"] == pytest.approx(128 / 252)


def test_a_maximized_objective_gets_the_negated_value(space):
    minimized = evaluate("zdt2", space, point(100, 32, 1e-3), TWO)
    mixed = evaluate("zdt2", space, point(100, 32, 1e-3), {"train_loss": "min", "tokens_per_second": "max"})
    assert mixed == {"train_loss": minimized["train_loss"], "tokens_per_second": -minimized["train_time"]}


@pytest.mark.parametrize("name", ["zdt1", "zdt2"])
def test_sampled_points_never_dominate_the_true_front(space, sample, name):
    front = true_front(name, 2, 501)
    Y = np.array([list(evaluate(name, space, p, TWO).values()) for p in sample])
    for y in Y:
        dominates = (y <= front + 1e-9).all(axis=1) & (y < front - 1e-9).any(axis=1)
        assert not dominates.any()
    # And the sample is a real test: most of it lies well behind the front.
    assert np.mean(Y[:, 1] > 1.5) > 0.5


def test_dtlz2_points_lie_on_or_outside_the_unit_sphere(space, sample):
    for objectives in (TWO, THREE):
        Y = np.array([list(evaluate("dtlz2", space, p, objectives).values()) for p in sample])
        assert Y.shape == (len(sample), len(objectives))
        assert np.all(np.linalg.norm(Y, axis=1) >= 1 - 1e-12)
        assert np.all(Y >= 0)
    # With three objectives the distance variable is the learning rate alone; at its
    # geometric midpoint (unit 0.5) the point is on the front.
    on_front = evaluate("dtlz2", space, point(128, 32, 10**-3.5), THREE)
    assert np.linalg.norm(list(on_front.values())) == pytest.approx(1.0, abs=1e-6)


def test_known_front_hypervolumes():
    assert hypervolume(true_front("zdt1", 2, 4001), reference_point("zdt1", 2)) == pytest.approx(121 - 1 / 3, abs=1e-3)
    assert hypervolume(true_front("zdt2", 2, 4001), reference_point("zdt2", 2)) == pytest.approx(121 - 2 / 3, abs=1e-3)
    assert hypervolume(true_front("dtlz2", 2, 4001), reference_point("dtlz2", 2)) == pytest.approx(
        1.21 - math.pi / 4, abs=1e-3
    )
    sphere = true_front("dtlz2", 3, 300)
    assert len(sphere) >= 300
    assert np.allclose(np.linalg.norm(sphere, axis=1), 1.0)
    assert non_dominated(sphere).all()
    # The lattice approaches the octant of the sphere from inside: 1.331 - pi/6 is the limit.
    coarse = hypervolume(sphere, reference_point("dtlz2", 3))
    fine = hypervolume(true_front("dtlz2", 3, 1000), reference_point("dtlz2", 3))
    assert coarse < fine < 1.331 - math.pi / 6 < fine + 0.02


def test_objective_counts_and_dimensions_are_checked(space):
    with pytest.raises(ValueError, match="objectives: zdt1 is defined for \\[2\\] objectives, 3 configured"):
        evaluate("zdt1", space, point(8, 16, 1e-3), THREE)
    with pytest.raises(ValueError, match="objectives: dtlz2"):
        evaluate("dtlz2", space, point(8, 16, 1e-3), {**THREE, "eval_loss": "min"})
    one_dim = SearchSpace.from_config({"lora_rank": STUDY["lora_rank"]})
    with pytest.raises(ValueError, match="benchmark.problem: zdt1 with 2 objectives needs at least 2"):
        evaluate("zdt1", one_dim, {"lora_rank": 8}, TWO)
    two_dim = SearchSpace.from_config({k: STUDY[k] for k in ("lora_rank", "learning_rate")})
    evaluate("dtlz2", two_dim, {"lora_rank": 8, "learning_rate": 1e-3}, TWO)
    with pytest.raises(ValueError, match="needs at least 3"):
        evaluate("dtlz2", two_dim, {"lora_rank": 8, "learning_rate": 1e-3}, THREE)
    with pytest.raises(ValueError, match="benchmark.problem: lora_surrogate has no analytic"):
        true_front("lora_surrogate", 2, 10)
    with pytest.raises(ValueError, match="benchmark.problem"):
        reference_point("lora_surrogate", 2)


def test_noise_is_gaussian_and_fixed_by_seed_and_trial(space, sample):
    clean = np.array([list(evaluate("zdt1", space, p, TWO).values()) for p in sample])
    noisy = np.array([list(evaluate("zdt1", space, p, TWO, seed=0, noise=0.1).values()) for p in sample])
    again = np.array([list(evaluate("zdt1", space, p, TWO, seed=0, noise=0.1).values()) for p in sample])
    other = np.array([list(evaluate("zdt1", space, p, TWO, seed=1, noise=0.1).values()) for p in sample])
    assert np.array_equal(noisy, again)
    assert not np.allclose(noisy, other)
    residual = (noisy - clean).ravel()
    assert abs(residual.mean()) < 0.02
    assert 0.085 < residual.std() < 0.115
    # Trials differ in their noise, so it is not a constant offset.
    assert np.std(noisy[:, 0] - clean[:, 0]) > 0.05


def test_surrogate_reports_every_metric_and_checks_objectives(space):
    metrics = evaluate("lora_surrogate", space, point(16, 32, 2e-4), TWO)
    assert set(metrics) == SURROGATE_METRICS
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["trainable_params"] == 16 * 2_621_440
    assert metrics["train_time"] == pytest.approx(1.5e6 / metrics["tokens_per_second"] + 60)
    with pytest.raises(ValueError, match="objectives: \\['accuracy'\\] not reported by lora_surrogate"):
        evaluate("lora_surrogate", space, point(16, 32, 2e-4), {"accuracy": "max"})


def test_surrogate_loss_is_u_shaped_in_the_effective_learning_rate(space):
    rates = np.logspace(-5, -2, 13)
    losses = [evaluate("lora_surrogate", space, point(16, 16, lr), TWO)["final_train_loss"] for lr in rates]
    best = int(np.argmin(losses))
    assert 0 < best < len(rates) - 1
    assert np.all(np.diff(losses[: best + 1]) < 0) and np.all(np.diff(losses[best:]) > 0)
    # Only lr * alpha / rank matters for the step: doubling alpha and halving lr is the same run.
    a = evaluate("lora_surrogate", space, point(16, 16, 4e-4), TWO)
    b = evaluate("lora_surrogate", space, point(16, 32, 2e-4), TWO)
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"])
    # At rank 64 the same lr and alpha give a 4x smaller step, so a larger lr is best.
    big = [evaluate("lora_surrogate", space, point(64, 16, lr), TWO)["final_train_loss"] for lr in rates]
    assert rates[int(np.argmin(big))] > rates[best]


def test_surrogate_rank_trades_loss_for_time_and_memory(space):
    ranks = [4, 16, 64, 256]
    # Keep the effective step alpha / rank * lr at its best value for every rank.
    runs = [evaluate("lora_surrogate", space, point(r, 16, min(4e-4 * r / 16, 1e-2)), TWO) for r in ranks]
    for key, direction in [
        ("final_train_loss", -1),
        ("train_time", 1),
        ("peak_memory_gib", 1),
        ("trainable_params", 1),
    ]:
        values = np.array([run[key] for run in runs])
        assert np.all(direction * np.diff(values) > 0), key
    assert np.all(np.diff([run["tokens_per_second"] for run in runs]) < 0)
    # Rank 4 -> 256 costs a few percent of throughput, as seen on the H200.
    assert 0.95 < runs[-1]["tokens_per_second"] / runs[0]["tokens_per_second"] < 0.99


def test_surrogate_noise_is_seeded_by_trial(space):
    p = point(32, 64, 5e-4)
    clean = evaluate("lora_surrogate", space, p, TWO)
    noisy = evaluate("lora_surrogate", space, p, TWO, seed=3, noise=0.05)
    assert noisy == evaluate("lora_surrogate", space, p, TWO, seed=3, noise=0.05)
    assert noisy != evaluate("lora_surrogate", space, p, TWO, seed=4, noise=0.05)
    assert noisy != clean and noisy["trainable_params"] == clean["trainable_params"]
    for key in ("train_loss", "eval_loss", "tokens_per_second"):
        assert abs(math.log(noisy[key] / clean[key])) < 0.05 * 5


def test_surrogate_defaults_for_parameters_not_searched():
    space = SearchSpace.from_config(
        {
            "lora_rank": STUDY["lora_rank"],
            "learning_rate": STUDY["learning_rate"],
            "lora_alpha": {"type": "fixed", "value": 32},
        }
    )
    with_alpha = evaluate("lora_surrogate", space, {"lora_rank": 16, "learning_rate": 2e-4}, TWO)
    lr_only = SearchSpace.from_config({"learning_rate": STUDY["learning_rate"]})
    defaults = evaluate("lora_surrogate", lr_only, {"learning_rate": 2e-4}, TWO)
    # Defaults are rank 16, alpha 16: half the step of alpha 32, so a different loss.
    assert defaults["trainable_params"] == with_alpha["trainable_params"]
    assert defaults["final_train_loss"] != with_alpha["final_train_loss"]


def test_surrogate_rejects_a_zero_rank():
    space = SearchSpace.from_config({"lora_rank": {"type": "int", "low": 0, "high": 8, "step": 4}})
    with pytest.raises(ValueError, match="lora_surrogate needs lora_rank > 0"):
        evaluate("lora_surrogate", space, {"lora_rank": 0}, TWO)


def test_surrogate_memory_limit_fails_large_ranks(space):
    small = evaluate("lora_surrogate", space, point(16, 32, 2e-4), TWO, memory_limit_gib=30)
    assert small["peak_memory_gib"] < 30
    with pytest.raises(SimulatedOutOfMemory, match="r256_a32_lr0.0002: modelled peak memory 34.1 GiB"):
        evaluate("lora_surrogate", space, point(256, 32, 2e-4), TWO, memory_limit_gib=30)
    with pytest.raises(ValueError, match="benchmark.memory_limit_gib: .* lora_surrogate only"):
        evaluate("zdt1", space, point(256, 32, 2e-4), TWO, memory_limit_gib=30)


# ---- learning curves: the table problem and the synthetic curves ---------------------------
import json  # noqa: E402

import pandas as pd  # noqa: E402

from loratune.benchmarks import CurveTable, problem_from_config, synthetic_curve  # noqa: E402
from loratune.config import ConfigError, validate_config  # noqa: E402

CURVE_SPACE = {
    "lora_rank": {"type": "int", "low": 4, "high": 16, "step": 4},
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}
# Four measured runs of 30 steps, evaluated at 10, 20, 30: A improves to the end, B overfits
# (best at 20), C diverges at step 20, D was measured twice (seeds 0 and 1).
CURVES = {
    ("A", 4, 1e-4, 0): [(2.0, 2.5), (1.5, 2.0), (1.2, 1.8)],
    ("B", 16, 1e-2, 0): [(1.4, 1.9), (1.1, 1.5), (1.3, 1.2)],
    ("C", 16, 1e-4, 0): [(1.8, 2.2), (float("nan"), float("nan"))],
    ("D", 4, 1e-2, 0): [(1.5, 2.0), (1.4, 1.8), (1.35, 1.7)],
    ("D", 4, 1e-2, 1): [(1.6, 2.1), (1.5, 1.9), (1.45, 1.8)],
}


def curve_rows():
    rows = []
    for (_, rank, lr, seed), evaluations in CURVES.items():
        for k, (eval_loss, train_loss) in enumerate(evaluations, start=1):
            rows.append(
                {
                    "lora_rank": rank,
                    "learning_rate": lr,
                    "seed": seed,
                    "step": 10 * k,
                    "max_steps": 30,
                    "eval_loss": eval_loss,
                    "train_loss": train_loss,
                    "train_time": 5.0 * k + rank / 4,
                    "trainable_params": 1000 * rank,
                    "peak_memory_gib": 1.0 + rank / 16,
                    "status": "ok" if math.isfinite(eval_loss) else "diverged",
                }
            )
    return rows


@pytest.fixture(params=["jsonl", "tsv"])
def curve_table(tmp_path, request) -> CurveTable:
    path = tmp_path / f"curves.{request.param}"
    if request.param == "jsonl":
        path.write_text("".join(json.dumps(row).replace("NaN", "null") + "\n" for row in curve_rows()))
    else:
        pd.DataFrame(curve_rows()).to_csv(path, sep="\t", index=False, na_rep="")
    return CurveTable(str(path))


@pytest.fixture
def curve_space() -> SearchSpace:
    return SearchSpace.from_config(CURVE_SPACE)


def ask(table, space, rank, lr, step=None, select="best", seed=0):
    return evaluate(
        table,
        space,
        {"lora_rank": rank, "learning_rate": lr},
        {"eval_loss": "min"},
        seed=seed,
        step=step,
        select=select,
    )


def test_a_point_not_in_the_table_gets_its_nearest_measured_point(curve_table, curve_space):
    # Rank 8 is a third of the way from 4 to 16 in unit coordinates, lr 1.5e-4 near 1e-4: run A.
    near = ask(curve_table, curve_space, 8, 1.5e-4)
    assert near["eval_loss"] == 1.2 and near["trainable_params"] == 4000
    # Rank 12 with lr 8e-3: nearest is B (rank 16, lr 1e-2).
    assert ask(curve_table, curve_space, 12, 8e-3)["trainable_params"] == 16000


def test_a_rung_is_answered_by_the_largest_measured_step_at_or_below_it(curve_table, curve_space):
    at25 = ask(curve_table, curve_space, 4, 1e-4, step=25)
    assert (at25["eval_loss"], at25["steps"], at25["train_seconds"]) == (1.5, 20, 11.0)
    assert [point["step"] for point in at25["curve"]] == [10, 20]
    with pytest.raises(ValueError, match=r"^benchmark.path: .* no evaluation at or before step 9"):
        ask(curve_table, curve_space, 4, 1e-4, step=9)


def test_select_best_takes_the_best_rows_values_and_last_the_rung_row(curve_table, curve_space):
    best = ask(curve_table, curve_space, 16, 1e-2, step=30, select="best")
    # The best evaluation (step 20) with that row's other columns; the cost is what was spent.
    assert (best["eval_loss"], best["train_loss"], best["train_time"], best["best_step"]) == (1.1, 1.5, 14.0, 20)
    assert (best["steps"], best["train_seconds"]) == (30, 19.0)
    last = ask(curve_table, curve_space, 16, 1e-2, step=30, select="last")
    assert (last["eval_loss"], last["train_loss"], last["best_step"]) == (1.3, 1.2, 30)
    assert ask(curve_table, curve_space, 16, 1e-2) == best  # no step: the full budget


def test_a_diverged_row_fails_the_trial_from_that_step_on(curve_table, curve_space):
    early = ask(curve_table, curve_space, 16, 1e-4, step=10)
    assert early["eval_loss"] == 1.8 and "status" not in early
    late = ask(curve_table, curve_space, 16, 1e-4, step=30)
    assert late["status"] == "failed" and "diverged at step 20" in late["error"]
    assert (late["steps"], late["train_seconds"]) == (20, 14.0) and "eval_loss" not in late


def test_repeats_of_a_point_are_picked_by_the_seed(curve_table, curve_space):
    assert ask(curve_table, curve_space, 4, 1e-2, seed=0)["eval_loss"] == 1.35
    assert ask(curve_table, curve_space, 4, 1e-2, seed=1)["eval_loss"] == 1.45
    assert ask(curve_table, curve_space, 4, 1e-2, seed=2)["eval_loss"] == 1.35


def table_config(path, objectives):
    return {
        "backend": "benchmark",
        "benchmark": {"problem": "table", "path": str(path)},
        "objectives": objectives,
        "search_space": dict(CURVE_SPACE),
        "arms": {"es": {"proposer": "random", "early_stopping": {"rungs": [0.34, 0.67, 1.0], "keep": 0.5}}},
    }


def test_table_configs_are_checked_naming_benchmark_path(tmp_path, curve_table):
    study = validate_config(table_config(curve_table.path, {"eval_loss": "min", "peak_memory_gib": "min"}))
    assert study.rung_steps("es") == [10, 20, 30]
    with pytest.raises(ConfigError, match=r"^benchmark.path: .*nowhere.jsonl: no such learning-curve table$"):
        validate_config(table_config(tmp_path / "nowhere.jsonl", {"eval_loss": "min"}))
    with pytest.raises(ConfigError, match=r"^benchmark.path: .* objective\(s\) \['tokens'\] are not metric columns"):
        validate_config(table_config(curve_table.path, {"tokens": "min"}))
    lacking = tmp_path / "lacking.tsv"
    pd.DataFrame(curve_rows()).drop(columns=["train_time"]).to_csv(lacking, sep="\t", index=False)
    with pytest.raises(ConfigError, match=r"^benchmark.path: .*lacking.tsv: lacks column\(s\) \['train_time'\]$"):
        validate_config(table_config(lacking, {"eval_loss": "min"}))
    with pytest.raises(ConfigError, match=r"^benchmark.path: the table problem needs"):
        validate_config(table_config("", {"eval_loss": "min"}))
    assert isinstance(problem_from_config({"problem": "table", "path": curve_table.path}), CurveTable)


def test_synthetic_curves_fall_then_rise_for_high_learning_rates(space):
    low, high = 0.0, 1.0
    fractions = np.linspace(0.05, 1.0, 20)
    low_curve = [synthetic_curve(t, low) for t in fractions]
    high_curve = [synthetic_curve(t, high) for t in fractions]
    assert np.all(np.diff(low_curve) < 0) and low_curve[-1] == 0.0  # improves to the end
    turn = int(np.argmin(high_curve))
    assert 0 < turn < len(fractions) - 1 and high_curve[-1] > 0.2  # falls, then overfits
    # At the full budget with select best, an analytic problem answers its own (known-front) values.
    for rank, alpha, lr in [(4, 16, 1e-5), (128, 64, 1e-2), (64, 8, 3e-4)]:
        plain = evaluate("zdt1", space, point(rank, alpha, lr), TWO)
        full = evaluate("zdt1", space, point(rank, alpha, lr), TWO, step=50, max_steps=50)
        assert {k: full[k] for k in TWO} == pytest.approx(plain)
        assert full["train_seconds"] == 50.0 and full["steps"] == 50
    last = evaluate("zdt1", space, point(128, 64, 1e-2), TWO, step=50, max_steps=50, select="last")
    assert last["train_loss"] > evaluate("zdt1", space, point(128, 64, 1e-2), TWO)["train_loss"]
    # Early on, a low learning rate looks worse than a high one of the same values.
    early_low = evaluate("lora_surrogate", space, point(16, 16, 1e-5), {"eval_loss": "min"}, step=5, max_steps=50)
    final_low = evaluate("lora_surrogate", space, point(16, 16, 1e-5), {"eval_loss": "min"})
    assert early_low["eval_loss"] > final_low["eval_loss"] and early_low["train_time"] < final_low["train_time"]

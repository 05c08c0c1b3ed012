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
    assert hypervolume(true_front("zdt1", 2, 4001), reference_point("zdt1", 2)) == pytest.approx(
        121 - 1 / 3, abs=1e-3
    )
    assert hypervolume(true_front("zdt2", 2, 4001), reference_point("zdt2", 2)) == pytest.approx(
        121 - 2 / 3, abs=1e-3
    )
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

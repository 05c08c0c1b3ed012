import numpy as np
import pandas as pd
import pytest

from loratune.designs import DESIGNS, grid_points, pilot_design, spread_subset
from loratune.space import SearchSpace

ALPHAS = (4, 8, 16, 32, 64, 128, 256)
# lhs seed 0 on the study space, as drawn at 3c44d3a (before scipy_lhs existed).
LHS_SEED0 = ["r240_a256_lr0.00404", "r64_a32_lr8.61e-05", "r156_a4_lr0.00072"]


@pytest.fixture
def space(study_space) -> SearchSpace:
    return study_space


def assert_valid(space, points):
    for point in points:
        assert point == space.snap(point)
        assert point["lora_rank"] % 4 == 0 and 4 <= point["lora_rank"] <= 256
        assert type(point["lora_rank"]) is int
        assert point["lora_alpha"] in ALPHAS and type(point["lora_alpha"]) is int
        assert 1e-5 <= point["learning_rate"] <= 1e-2
        assert point["lora_dropout"] == 0.05


@pytest.mark.parametrize("method", DESIGNS)
def test_designs_are_deterministic_distinct_and_valid(space, method):
    points = pilot_design(space, 12, method, seed=3)
    assert len(points) == 12
    assert len({space.key(p) for p in points}) == 12
    assert_valid(space, points)
    assert pilot_design(space, 12, method, seed=3) == points
    assert pilot_design(space, 12, method, seed=4) != points


@pytest.mark.parametrize("method", DESIGNS)
def test_a_small_finite_space_is_exhausted(method):
    space = SearchSpace.from_config(
        {
            "lora_rank": {"type": "int", "low": 4, "high": 16, "step": 4},
            "lora_alpha": {"type": "choice", "values": [16, 32]},
        }
    )
    points = pilot_design(space, 20, method, seed=0)
    assert len(points) == 8
    assert {space.key(p) for p in points} == {space.key(p) for p in space.all_points()}
    assert pilot_design(space, 0, method, seed=0) == []


def test_unknown_design_names_the_config_field(space):
    with pytest.raises(ValueError, match=r"pilot\.design: unknown 'sobol'"):
        pilot_design(space, 4, "sobol", seed=0)
    with pytest.raises(ValueError, match=r"pilot\.n: must be an integer >= 0"):
        pilot_design(space, -1, "random", seed=0)


def test_random_sets_draws_every_level_equally_often_random_does_not():
    space = SearchSpace.from_config(
        {
            "lora_alpha": {"type": "choice", "values": list(ALPHAS)},
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        }
    )
    n = 2000

    def share_of_ends(method):
        alphas = [p["lora_alpha"] for p in pilot_design(space, n, method, seed=0)]
        counts = pd.Series(alphas).value_counts(normalize=True)
        assert set(counts.index) == set(ALPHAS)
        return counts[4], counts[256], counts

    low, high, counts = share_of_ends("random_sets")
    assert np.all(np.abs(counts.to_numpy() - 1 / 7) < 0.03)
    # Uniform in the unit cube, an end level owns half an interval: 1/12 of the draws.
    low, high, _ = share_of_ends("random")
    assert abs(low - 1 / 12) < 0.02 and abs(high - 1 / 12) < 0.02


def test_random_is_log_uniform_in_a_log_parameter(space):
    rates = np.array([p["learning_rate"] for p in pilot_design(space, 1000, "random", seed=5)])
    below = np.mean(rates < 10**-3.5)
    assert 0.45 < below < 0.55  # the geometric midpoint of 1e-5..1e-2 splits the draws


@pytest.mark.parametrize("method", ["lhs", "scipy_lhs"])
@pytest.mark.parametrize("n, seed", [(12, 0), (7, 1), (30, 2)])
def test_lhs_puts_one_point_in_every_slice_of_every_axis(space, n, seed, method):
    points = pilot_design(space, n, method, seed=seed)
    U = space.to_unit_rows(points)
    # The learning rate is continuous up to 3 digits: exactly one point per slice.
    assert sorted(np.floor(U[:, 2] * n).astype(int)) == list(range(n))
    # Rank snaps to a grid of 63 steps, so a point can move half a step out of its slice.
    half_step = 0.5 / 63
    ranks = np.sort(U[:, 0])
    slices = np.arange(n)
    assert np.all(ranks >= slices / n - half_step - 1e-12)
    assert np.all(ranks <= (slices + 1) / n + half_step + 1e-12)


def test_lhs_keeps_the_recorded_trials_and_scipy_lhs_is_its_own_design(space):
    # Every recorded study's pilot depends on lhs's draws: seed 0 of the study space, as it was.
    assert [space.trial_id(p) for p in pilot_design(space, 3, "lhs", seed=0)] == LHS_SEED0
    assert pilot_design(space, 3, "scipy_lhs", seed=0) != pilot_design(space, 3, "lhs", seed=0)


def test_grid_points_of_the_study_space(space):
    grid = grid_points(space, 4)
    assert len(grid) == 4**3
    assert_valid(space, grid)
    assert sorted({p["lora_rank"] for p in grid}) == [4, 88, 172, 256]
    assert sorted({p["lora_alpha"] for p in grid}) == [4, 16, 64, 256]
    assert sorted({p["learning_rate"] for p in grid}) == [1e-5, 1e-4, 1e-3, 1e-2]
    center = grid_points(space, 1)
    assert center == [space.from_unit([0.5, 0.5, 0.5])]


def test_grid_points_takes_every_level_of_a_short_axis():
    space = SearchSpace.from_config(
        {
            "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4},
            "lora_alpha": {"type": "choice", "values": [16, 32, 64]},
        }
    )
    grid = grid_points(space, 5)
    assert len(grid) == 5 * 3
    assert sorted({p["lora_alpha"] for p in grid}) == [16, 32, 64]
    with pytest.raises(ValueError, match="levels_per_dim"):
        grid_points(space, 0)


def test_grid_design_is_a_spread_subset_of_a_grid(space):
    points = pilot_design(space, 10, "grid", seed=0)
    grid_keys = {space.key(p) for p in grid_points(space, 3)}
    assert {space.key(p) for p in points} <= grid_keys
    # A grid design of 10 points uses both ends of every axis.
    U = space.to_unit_rows(points)
    assert np.all(U.min(axis=0) == 0.0) and np.all(U.max(axis=0) == 1.0)


def _plane():
    return SearchSpace.from_config(
        {"x": {"type": "float", "low": 0.0, "high": 1.0}, "y": {"type": "float", "low": 0.0, "high": 1.0}}
    )


def test_spread_subset_is_greedy_maximin():
    plane = _plane()
    candidates = [{"x": x, "y": y} for x in np.linspace(0, 1, 5) for y in np.linspace(0, 1, 5)]
    for seed in range(4):
        chosen = spread_subset(plane, candidates, 3, existing=[{"x": 0.0, "y": 0.0}], seed=seed)
        assert chosen[0] == {"x": 1.0, "y": 1.0}  # the unique farthest from the origin
        assert {plane.key(p) for p in chosen[1:]} == {(0.0, 1.0), (1.0, 0.0)}
    # Then the centre (0.5, 0.5) is the farthest from the four corners.
    chosen = spread_subset(plane, candidates, 4, existing=[{"x": 0.0, "y": 0.0}], seed=0)
    assert chosen[3] == {"x": 0.5, "y": 0.5}


def test_spread_subset_breaks_ties_by_seed():
    plane = _plane()
    candidates = [{"x": x, "y": y} for x in np.linspace(0, 1, 5) for y in np.linspace(0, 1, 5)]
    firsts = {plane.key(spread_subset(plane, candidates, 1, seed=s)[0]) for s in range(20)}
    assert len(firsts) > 1
    assert spread_subset(plane, candidates, 6, seed=7) == spread_subset(plane, candidates, 6, seed=7)


def test_spread_subset_skips_existing_and_repeated_candidates(space):
    grid = grid_points(space, 2)
    history = pd.DataFrame(grid[:5]).assign(train_loss=1.0, status="ok")
    chosen = spread_subset(space, grid + grid, 100, existing=history, seed=0)
    assert len(chosen) == len(grid) - 5
    assert {space.key(p) for p in chosen} == {space.key(p) for p in grid[5:]}
    assert spread_subset(space, grid, 0) == []
    assert spread_subset(space, grid[:3], 5, existing=grid) == []

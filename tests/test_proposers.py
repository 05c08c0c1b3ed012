"""The proposer contract, for every registered proposer (Optuna with each of its samplers):
new, distinct, snapped points, deterministic for a seed, failed trials never proposed again,
finite spaces exhausted gracefully, one-line errors. The model-based proposers run here with
small searches to stay fast; their learning is tested in test_gptune.py and
test_optuna_botorch.py."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loratune import SearchSpace
from loratune.designs import grid_points
from loratune.proposers import AVAILABLE_PROPOSERS, make_proposer
from loratune.proposers.base import split_history
from conftest import STUDY_SPACE

REPO = Path(__file__).resolve().parents[1]

TINY_SPACE = {
    "lora_rank": {"type": "int", "low": 8, "high": 24, "step": 8},
    "lora_alpha": {"type": "choice", "values": [16, 32, 64]},
    "lora_dropout": {"type": "fixed", "value": 0.0},
}
OBJECTIVES = {"train_loss": "min", "train_time": "min"}
# Every registered proposer held to the contract, by arm name: (proposer, options that keep the
# tests fast). A proposer added to the registry must join this (see the registry test).
FAST = {
    "random": ("random", {}),
    "grid": ("grid", {}),
    "gptune": ("gptune", {"population_size": 16, "generations": 10, "gp_restarts": 1}),
    "botorch": ("botorch", {"num_restarts": 2, "raw_samples": 64, "mc_samples": 32}),
    "optuna-tpe": ("optuna", {"sampler": "tpe"}),
    "optuna-gp": ("optuna", {"sampler": "gp", "qmc_samples": 16}),
    "optuna-nsga2": ("optuna", {"sampler": "nsga2", "population_size": 4}),
}
PROPOSERS = tuple(FAST)


def proposer(arm, space, seed=0, objectives=OBJECTIVES):
    name, options = FAST[arm]
    return make_proposer(name, space=space, objectives=objectives, seed=seed, **options)


def objective_values(space, point):
    """Two smooth, conflicting objectives (loss falls with rank, time rises)."""
    u = space.to_unit(point)
    return {"train_loss": float(1.0 - u[0] + (u[1:] ** 2).sum()), "train_time": float(u[0] + 0.1 * u[-1])}


def make_history(space, points, status="ok"):
    rows = [{**p, **objective_values(space, p), "status": status} for p in points]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study_history(study_space):
    rng = np.random.default_rng(7)
    points = [study_space.from_unit(u) for u in rng.random((8, study_space.dim))]
    return make_history(study_space, points)


def assert_valid_new(space, proposals, history, n):
    assert len(proposals) == n
    keys = [space.key(p) for p in proposals]
    assert len(set(keys)) == n, "proposals repeat"
    taken = {space.key(row) for row in history[space.tunable_names].to_dict("records")}
    assert not taken & set(keys), "a proposal is already in the history"
    for point in proposals:
        assert point == space.snap(point), f"not snapped: {point}"
        assert set(point) == set(space.names)
        assert point["lora_dropout"] == space.fixed["lora_dropout"]
        assert 4 <= point["lora_rank"] <= 256 and point["lora_rank"] % 4 == 0
        assert point["lora_alpha"] in STUDY_SPACE["lora_alpha"]["values"]
        assert 1e-5 <= point["learning_rate"] <= 1e-2


def test_registry_names_every_proposer_without_importing_them():
    assert {name for name, _ in FAST.values()} == set(AVAILABLE_PROPOSERS)
    code = (
        "import sys\n"
        "from loratune import SearchSpace, make_proposer\n"
        "from loratune.proposers import AVAILABLE_PROPOSERS\n"
        "space = SearchSpace.from_config({'x': {'type': 'float', 'low': 0, 'high': 1}})\n"
        "make_proposer('random', space=space, objectives={'y': 'min'}).propose(None, 2)\n"
        "heavy = [m for m in ('GPy', 'pygmo', 'GPTune', 'optuna', 'botorch') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", PROPOSERS)
def test_proposals_are_new_distinct_snapped_points(name, study_space, study_history):
    proposals = proposer(name, study_space).propose(study_history, 5)
    assert_valid_new(study_space, proposals, study_history, 5)


@pytest.mark.parametrize("name", PROPOSERS)
def test_same_seed_same_proposals_other_seed_others(name, study_space, study_history):
    first = proposer(name, study_space, seed=3)
    again = first.propose(study_history, 4)
    assert first.propose(study_history, 4) == again, "a second call on one proposer differs"
    assert proposer(name, study_space, seed=3).propose(study_history, 4) == again
    # The grid's seed only breaks ties between equally spread grid points, as on an empty
    # history; with this history its maximin picks are unique.
    history = None if name == "grid" else study_history
    assert proposer(name, study_space, seed=4).propose(history, 4) != proposer(
        name, study_space, seed=3
    ).propose(history, 4)


@pytest.mark.parametrize("name", PROPOSERS)
def test_empty_history_gives_n_points(name, study_space):
    for history in (None, pd.DataFrame()):
        proposals = proposer(name, study_space).propose(history, 3)
        assert_valid_new(study_space, proposals, pd.DataFrame(columns=study_space.names), 3)


@pytest.mark.parametrize("name", PROPOSERS)
def test_failed_points_are_never_proposed_again(name):
    # 9 points: 3 ok, 3 failed in different ways; the 3 untried ones are all that is left.
    space = SearchSpace.from_config(TINY_SPACE)
    points = space.all_points()
    history = make_history(space, points[:6])
    history.loc[3, "status"] = "failed"
    history.loc[4, "train_loss"] = np.nan
    history.loc[5, "train_time"] = np.inf
    proposals = proposer(name, space).propose(history, 3)
    assert sorted(space.key(p) for p in proposals) == sorted(space.key(p) for p in points[6:])


@pytest.mark.parametrize("name", PROPOSERS)
def test_history_of_only_failures(name, study_space, study_history):
    history = study_history.copy()
    history["status"] = "failed"
    history[["train_loss", "train_time"]] = np.nan
    proposals = proposer(name, study_space).propose(history, 4)
    assert_valid_new(study_space, proposals, history, 4)


@pytest.mark.parametrize("name", PROPOSERS)
def test_tiny_space_is_exhausted_gracefully(name):
    space = SearchSpace.from_config(TINY_SPACE)
    points = space.all_points()
    history = make_history(space, points[:2])
    rest = proposer(name, space).propose(history, 20)
    assert sorted(space.key(p) for p in rest) == sorted(space.key(p) for p in points[2:])
    assert proposer(name, space).propose(make_history(space, points), 4) == []
    assert proposer(name, space).propose(history, 0) == []


def test_split_history_flags_failures_and_negates_maxima():
    space = SearchSpace.from_config(TINY_SPACE)
    points = space.all_points()[:5]
    history = pd.DataFrame(
        [{**p, "loss": float(i), "acc": 10.0 * i} for i, p in enumerate(points)]
    )
    history["status"] = ["ok", "ok", "failed", "ok", "ok"]
    history["acc"] = history["acc"].astype(object)
    history.loc[3, "acc"] = "nan"  # as a TSV reader may leave it
    history.loc[4, "loss"] = -np.inf
    split = split_history(space, {"loss": "min", "acc": "max"}, history)
    assert [space.key(p) for p in split.ok_points] == [space.key(p) for p in points[:2]]
    np.testing.assert_allclose(split.Y_min, [[0.0, -0.0], [1.0, -10.0]])
    np.testing.assert_allclose(split.X_unit, space.to_unit_rows(points[:2]))
    assert len(split.evaluated) == 5

    no_status = history.drop(columns="status")
    assert len(split_history(space, {"loss": "min", "acc": "max"}, no_status).ok_points) == 3


def test_random_is_log_uniform_for_log_parameters(study_space):
    proposals = proposer("random", study_space).propose(None, 400)
    median = float(np.median([p["learning_rate"] for p in proposals]))
    # log-uniform on [1e-5, 1e-2]: median 10^-3.5; linear uniform would give about 5e-3.
    assert 1e-4 < median < 1e-3


def test_grid_takes_grid_points_then_refines():
    space = SearchSpace.from_config({"x": {"type": "float", "low": 0.0, "high": 1.0}})
    grid = grid_points(space, 4)
    first = proposer("grid", space).propose(None, 4)
    assert sorted(p["x"] for p in first) == sorted(p["x"] for p in grid)
    history = pd.DataFrame([{"x": p["x"], "train_loss": 1.0, "train_time": 1.0} for p in grid])
    finer = proposer("grid", space).propose(history, 3)
    # The 7-level grid keeps the 4 old levels and adds the 3 between them.
    assert sorted(p["x"] for p in finer) == pytest.approx([1 / 6, 1 / 2, 5 / 6], abs=1e-3)


def test_grid_spreads_its_first_points():
    space = SearchSpace.from_config(TINY_SPACE)
    two = proposer("grid", space).propose(None, 2)
    u = space.to_unit_rows(two)
    assert math.isclose(float(np.linalg.norm(u[0] - u[1])), math.sqrt(2)), "not opposite corners"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: make_proposer("x", s, OBJECTIVES), "proposer: unknown 'x'; choose one of ["),
        (lambda s: make_proposer("random", s, {}), "objectives"),
        (lambda s: make_proposer("random", s, ["train_loss"]), "objectives"),
        (lambda s: make_proposer("random", s, {"train_loss": "minimize"}), "objectives.train_loss"),
        (lambda s: make_proposer("random", s, OBJECTIVES, foo=1), "proposer.random: unknown option 'foo'"),
        (lambda s: make_proposer("grid", s, OBJECTIVES, levels_per_dim=0), "proposer.grid.levels_per_dim"),
        (lambda s: make_proposer("random", s, OBJECTIVES, seed=-1), "seed"),
        (
            lambda s: make_proposer("gptune", s, OBJECTIVES, population_size=10),
            "proposer.gptune.population_size",
        ),
        (
            lambda s: make_proposer("gptune", s, OBJECTIVES, restarts=2),
            "proposer.gptune: unknown option 'restarts'",
        ),
        (lambda s: make_proposer("random", s, OBJECTIVES).propose(None, -1), "n:"),
        (lambda s: make_proposer("random", s, OBJECTIVES).propose(None, 2.5), "n:"),
        (
            lambda s: make_proposer("random", s, {"loss": "min"}).propose(
                pd.DataFrame([{"lora_rank": 8, "lora_alpha": 16, "learning_rate": 1e-4, "train_loss": 1}]),
                1,
            ),
            "history: no column 'loss'",
        ),
    ],
)
def test_bad_input_gives_one_line_error_naming_the_field(call, message, study_space):
    with pytest.raises(ValueError) as error:
        call(study_space)
    text = str(error.value)
    assert message in text
    assert "\n" not in text


# ---- LoRA-aware coordinates (optuna's ``coordinates`` option) ------------------------------
@pytest.mark.parametrize("kind", ["lora", "rslora"])
def test_lora_coordinates_round_trip_every_point(kind, study_space):
    from loratune.proposers.coordinates import UPDATE, LoraCoordinates

    coordinates = LoraCoordinates(study_space, kind)
    rng = np.random.default_rng(3)
    for u in rng.random((200, study_space.dim)):
        point = study_space.from_unit(u)
        encoded = coordinates.encode(point)
        scale = point["lora_alpha"] / (point["lora_rank"] if kind == "lora" else math.sqrt(point["lora_rank"]))
        assert encoded[UPDATE] == pytest.approx(point["learning_rate"] * scale)
        low, high = coordinates.bounds[UPDATE]
        assert low <= encoded[UPDATE] <= high
        assert coordinates.decode(encoded) == point


@pytest.mark.parametrize("sampler", ["gp", "tpe"])
def test_optuna_in_lora_coordinates_keeps_the_contract(sampler, study_space, study_history):
    options = {"sampler": sampler, "coordinates": "lora", **({"qmc_samples": 16} if sampler == "gp" else {})}
    make = lambda seed: make_proposer("optuna", space=study_space, objectives=OBJECTIVES, seed=seed, **options)  # noqa: E731
    first = make(1).propose(study_history, 3)
    assert_valid_new(study_space, first, study_history, 3)
    assert make(1).propose(study_history, 3) == first
    raw = make_proposer("optuna", space=study_space, objectives=OBJECTIVES, seed=1, sampler=sampler).propose(
        study_history, 3
    )
    assert raw != first  # the sampler models other coordinates


@pytest.mark.parametrize("kind", ["lora", "rslora"])
def test_lora_unit_features_match_the_encoding_and_carry_gradients(kind, study_space):
    """The torch map from the cube (the botorch proposer's input transform) gives, at every
    snapped point, the normalized logs of ``encode``'s coordinates, and has a gradient."""
    import torch

    from loratune.proposers.coordinates import UPDATE, LoraCoordinates

    coordinates = LoraCoordinates(study_space, kind)
    rng = np.random.default_rng(5)
    points = [study_space.from_unit(u) for u in rng.random((50, study_space.dim))]
    U = torch.tensor(study_space.to_unit_rows(points), dtype=torch.double, requires_grad=True)
    features = coordinates.unit_features(U)
    for point, row in zip(points, features.detach().numpy()):
        encoded = coordinates.encode(point)
        for i, name in enumerate(study_space.tunable_names):
            key = UPDATE if name == "learning_rate" else name
            if key in coordinates.bounds:
                low, high = (math.log(b) for b in coordinates.bounds[key])
                assert row[i] == pytest.approx((math.log(encoded[key]) - low) / (high - low))
            else:
                assert row[i] == pytest.approx(study_space.to_unit(point)[i])
    assert features.min() >= -1e-9 and features.max() <= 1 + 1e-9
    features[:, study_space.tunable_names.index("learning_rate")].sum().backward()
    assert torch.all(U.grad[:, study_space.tunable_names.index("learning_rate")] > 0)


def test_botorch_in_lora_coordinates_keeps_the_contract(study_space, study_history):
    make = lambda seed, **o: make_proposer(  # noqa: E731
        "botorch", space=study_space, objectives=OBJECTIVES, seed=seed, num_restarts=2, raw_samples=64, **o
    )
    first = make(1, coordinates="lora").propose(study_history, 3)
    assert_valid_new(study_space, first, study_history, 3)
    assert make(1, coordinates="lora").propose(study_history, 3) == first
    assert make(1).propose(study_history, 3) != first  # the GPs see other inputs
    with pytest.raises(ValueError, match=r"^proposer.botorch.coordinates: unknown 'log'"):
        make(1, coordinates="log")
    with pytest.raises(ValueError, match=r"^proposer.botorch: coordinates and input_warping"):
        make(1, coordinates="lora", input_warping=True)


def test_lora_coordinates_need_a_learning_rate():
    space = SearchSpace.from_config(TINY_SPACE)
    history = make_history(space, [space.from_unit(np.full(space.dim, u)) for u in (0.1, 0.5, 0.9)])
    with pytest.raises(ValueError, match=r"^proposer coordinates lora: needs learning_rate as a tunable float"):
        make_proposer("optuna", space=space, objectives=OBJECTIVES, sampler="tpe", coordinates="lora").propose(
            history, 2
        )
    with pytest.raises(ValueError, match=r"^proposer.optuna.coordinates: unknown 'log'"):
        make_proposer("optuna", space=space, objectives=OBJECTIVES, coordinates="log")

import math
import re

import numpy as np
import pytest

from loratune.space import ChoiceParam, FloatParam, IntParam, SearchSpace, SpaceError
from conftest import STUDY_SPACE as STUDY



@pytest.fixture
def space(study_space) -> SearchSpace:
    return study_space


def test_from_config_builds_the_study_space(space):
    assert space.names == ["lora_rank", "lora_alpha", "learning_rate", "lora_dropout"]
    assert space.tunable_names == ["lora_rank", "lora_alpha", "learning_rate"]
    assert space.dim == 3
    assert space.fixed == {"lora_dropout": 0.05}
    assert isinstance(space["lora_rank"], IntParam)
    assert isinstance(space["lora_alpha"], ChoiceParam)
    assert isinstance(space["learning_rate"], FloatParam)
    assert space.cardinality is None


def test_snap_puts_each_kind_on_its_grid(space):
    point = space.snap({"lora_rank": 7, "lora_alpha": 20, "learning_rate": 3.14159e-4})
    assert point == {"lora_rank": 8, "lora_alpha": 16, "learning_rate": 3.14e-4, "lora_dropout": 0.05}
    clamped = space.snap({"lora_rank": 1000, "lora_alpha": "32", "learning_rate": 1.0, "lora_dropout": 0.3})
    assert clamped == {"lora_rank": 256, "lora_alpha": 32, "learning_rate": 1e-2, "lora_dropout": 0.05}
    assert space.snap({"lora_rank": -3, "lora_alpha": 1, "learning_rate": 0.0})["lora_rank"] == 4
    assert space.snap({"lora_rank": -3, "lora_alpha": 1, "learning_rate": 0.0})["learning_rate"] == 1e-5


def test_snap_rejects_missing_and_non_finite_values(space):
    with pytest.raises(SpaceError, match="learning_rate"):
        space.snap({"lora_rank": 8, "lora_alpha": 16})
    with pytest.raises(SpaceError, match="search_space.learning_rate"):
        space.snap({"lora_rank": 8, "lora_alpha": 16, "learning_rate": float("nan")})
    with pytest.raises(SpaceError, match="search_space.lora_rank"):
        space.snap({"lora_rank": float("nan"), "lora_alpha": 16, "learning_rate": 1e-3})
    with pytest.raises(SpaceError, match="search_space.lora_alpha"):
        space.snap({"lora_rank": 8, "lora_alpha": float("nan"), "learning_rate": 1e-3})
    with pytest.raises(SpaceError, match="search_space.lora_alpha"):
        space.snap({"lora_rank": 8, "lora_alpha": "big", "learning_rate": 1e-3})
    with pytest.raises(SpaceError, match="learning_rate"):
        space.to_unit({"lora_rank": 8, "lora_alpha": 16})


def test_unit_round_trip_of_every_level(space):
    rank, alpha = space["lora_rank"], space["lora_alpha"]
    for value in rank.levels:
        assert rank.from_unit(rank.to_unit(value)) == value
    for value in alpha.levels:
        assert alpha.from_unit(alpha.to_unit(value)) == value
    assert rank.to_unit(4) == 0.0 and rank.to_unit(256) == 1.0
    assert alpha.to_unit(4) == 0.0 and alpha.to_unit(32) == 0.5 and alpha.to_unit(256) == 1.0


def test_unit_round_trip_of_log_floats(space):
    lr = space["learning_rate"]
    assert lr.to_unit(1e-5) == pytest.approx(0.0)
    assert lr.to_unit(1e-2) == pytest.approx(1.0)
    assert lr.to_unit(10**-3.5) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    for u in rng.random((200, 3)):
        point = space.from_unit(u)
        assert space.from_unit(space.to_unit(point)) == point
        # Snapping the learning rate to 3 digits moves it by far less than a unit step of 1e-3.
        assert abs(space.to_unit(point)[2] - u[2]) < 1e-3


def test_log_int_is_spread_on_a_log_scale():
    space = SearchSpace.from_config(
        {"lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4, "log": True}}
    )
    assert space.from_unit([0.5])["lora_rank"] == 32
    assert space.to_unit({"lora_rank": 32})[0] == pytest.approx(0.5)


def test_trial_id_round_trip(space):
    point = {"lora_rank": 64, "lora_alpha": 16, "learning_rate": 0.000316}
    assert space.trial_id(point) == "r64_a16_lr0.000316"
    rng = np.random.default_rng(1)
    points = [space.from_unit(u) for u in rng.random((300, 3))]
    points.append(space.snap({"lora_rank": 4, "lora_alpha": 4, "learning_rate": 1e-5}))
    for point in points:
        trial_id = space.trial_id(point)
        assert space.parse_trial_id(trial_id) == point
        assert re.fullmatch(space.trial_id_pattern, trial_id)
    assert space.trial_id(points[-1]) == "r4_a4_lr1e-05"


def test_parse_trial_id_rejects_ids_outside_the_space(space):
    with pytest.raises(SpaceError, match="does not match"):
        space.parse_trial_id("r64_a16")
    with pytest.raises(SpaceError, match="expected 'a'"):
        space.parse_trial_id("r64_b16_lr0.001")
    with pytest.raises(SpaceError, match="not a point"):
        space.parse_trial_id("r6_a16_lr0.001")  # rank 6 is off the step of 4
    with pytest.raises(SpaceError, match="bad value for lora_alpha"):
        space.parse_trial_id("r64_a17_lr0.001")
    with pytest.raises(SpaceError, match="bad value for learning_rate"):
        space.parse_trial_id("r64_a16_lrfast")


def test_key_identifies_equivalent_points(space):
    a = {"lora_rank": 64, "lora_alpha": 16, "learning_rate": 3.1604e-4}
    b = {"lora_rank": 65, "lora_alpha": 16.0, "learning_rate": 3.16e-4, "lora_dropout": 0.1}
    assert space.key(a) == space.key(b) == (64, 16, 3.16e-4)
    assert space.key(a) != space.key({**a, "lora_rank": 68})


def test_finite_space_lists_every_point(space):
    finite = SearchSpace.from_config({k: v for k, v in STUDY.items() if k != "learning_rate"})
    assert finite.cardinality == 64 * 7
    points = finite.all_points()
    assert len(points) == finite.cardinality
    assert len({finite.key(p) for p in points}) == finite.cardinality
    assert all(p["lora_dropout"] == 0.05 and p["lora_rank"] % 4 == 0 for p in points)
    with pytest.raises(SpaceError, match="float"):
        space.all_points()


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"lora_rank": {"type": "int", "low": 64, "high": 4}}, "search_space.lora_rank: empty range"),
        (
            {"learning_rate": {"type": "float", "low": 1e-2, "high": 1e-2}},
            "search_space.learning_rate: empty range",
        ),
        ({"lora_alpha": {"type": "choice", "values": []}}, "search_space.lora_alpha.values"),
        ({"lora_rank": {"type": "int", "low": 4, "high": 256, "step": 5}}, "search_space.lora_rank.step"),
        ({"lora_rank": {"type": "int", "low": 4, "high": 256, "step": 0}}, "search_space.lora_rank.step"),
        ({"lora_rank": {"type": "int", "low": 4.5, "high": 256}}, "search_space.lora_rank.low"),
        ({"lora_rank": {"type": "integer", "low": 4, "high": 256}}, "search_space.lora_rank.type"),
        ({"lora_rank": {"low": 4, "high": 256}}, "search_space.lora_rank.type"),
        ({"lora_rank": {"type": "int", "low": 4}}, "search_space.lora_rank.high: missing"),
        ({"lora_alpha": {"type": "choice"}}, "search_space.lora_alpha.values: missing"),
        ({"lora_dropout": {"type": "fixed"}}, "search_space.lora_dropout.value: missing"),
        (
            {"learning_rate": {"type": "float", "low": 0.0, "high": 1.0, "log": True}},
            "search_space.learning_rate.log",
        ),
        (
            {"lora_rank": {"type": "int", "low": 4, "high": 8, "stride": 2}},
            "search_space.lora_rank: unknown key",
        ),
        (
            {"lora_alpha": {"type": "choice", "values": [16, 16]}},
            "search_space.lora_alpha.values: values repeat",
        ),
        ({"lora_alpha": {"type": "choice", "values": ["a_b"]}}, "search_space.lora_alpha.values"),
        ({"lora_dropout": {"type": "fixed", "value": 0.05}}, "search_space: no parameter to tune"),
        ({"lora rank": {"type": "int", "low": 4, "high": 8}}, "search_space.lora rank"),
        ({}, "search_space: must be a non-empty mapping"),
    ],
)
def test_config_errors_name_their_field(spec, field):
    with pytest.raises(SpaceError) as error:
        SearchSpace.from_config(spec)
    assert str(error.value).startswith(field)


def test_float_digits_control_the_snap():
    space = SearchSpace.from_config({"x": {"type": "float", "low": 0.0, "high": 1.0, "digits": 2}})
    assert space.snap({"x": 0.123456}) == {"x": 0.12}
    assert space.trial_id({"x": 0.123456}) == "x0.12"
    assert math.isclose(space.to_unit({"x": 0.5})[0], 0.5)

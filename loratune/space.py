"""The search space: parameter kinds, their encoding to the unit cube, and trial ids.

A point is a plain ``dict`` mapping parameter names to values. Every point that leaves this
module is *snapped*: stepped integers lie on their step, a ``choice`` is exactly one of its
values, and floats are rounded to ``digits`` significant digits. Snapping makes a point's
trial id an exact, reversible encoding of its values, so the id in a file name or in
``snakemake -n`` output says which hyperparameters a trial trains.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "SpaceError",
    "IntParam",
    "ChoiceParam",
    "FloatParam",
    "FixedParam",
    "SearchSpace",
]

# Short names used in trial ids; any other parameter uses its name without underscores.
ABBREVIATIONS = {
    "lora_rank": "r",
    "lora_alpha": "a",
    "learning_rate": "lr",
    "lora_dropout": "do",
    "weight_decay": "wd",
    "warmup_ratio": "wu",
}

_ID_VALUE = r"[A-Za-z0-9.+\-]+"


class SpaceError(ValueError):
    """A search space definition is invalid; the message names the field."""


def _abbreviation(name: str) -> str:
    return ABBREVIATIONS.get(name, name.replace("_", ""))


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _finite(name: str, value: Any) -> float:
    # NaN would slip through min/max clamping and give a trial id like "lrnan".
    number = _finite_or_none(value)
    if number is None:
        raise SpaceError(f"search_space.{name}: {value!r} is not a finite number")
    return number


def _round_significant(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def _scale_to_unit(value: float, low: float, high: float, log: bool) -> float:
    if log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def _scale_from_unit(u: float, low: float, high: float, log: bool) -> float:
    u = min(max(float(u), 0.0), 1.0)
    if log:
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return low + u * (high - low)


@dataclass(frozen=True)
class IntParam:
    """An integer from ``low`` to ``high`` (inclusive) on a grid of ``step``; ``log`` encodes
    it on a log scale for the models (rank 4..256 is searched more evenly that way)."""

    name: str
    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        where = f"search_space.{self.name}"
        if self.step < 1:
            raise SpaceError(f"{where}.step: must be >= 1, got {self.step}")
        if self.high < self.low:
            raise SpaceError(f"{where}: empty range, low {self.low} > high {self.high}")
        if (self.high - self.low) % self.step:
            raise SpaceError(
                f"{where}.step: {self.step} does not divide high - low ({self.high - self.low})"
            )
        if self.log and self.low <= 0:
            raise SpaceError(f"{where}.log: needs low > 0, got {self.low}")

    @property
    def levels(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def to_unit(self, value: Any) -> float:
        if self.high == self.low:
            return 0.5
        return _scale_to_unit(value, self.low, self.high, self.log)

    def from_unit(self, u: float) -> int:
        return self.snap(_scale_from_unit(u, self.low, self.high, self.log))

    def snap(self, value: Any) -> int:
        value = _finite(self.name, value)
        index = round((value - self.low) / self.step)
        index = min(max(index, 0), (self.high - self.low) // self.step)
        return int(self.low + index * self.step)

    def format(self, value: Any) -> str:
        return str(int(value))

    def parse(self, text: str) -> int:
        return int(text)


@dataclass(frozen=True)
class ChoiceParam:
    """One of a set of values, searched as an ordinal index in the given order."""

    name: str
    values: tuple

    def __post_init__(self) -> None:
        where = f"search_space.{self.name}.values"
        if len(self.values) == 0:
            raise SpaceError(f"{where}: empty set of values")
        if len(set(self.values)) != len(self.values):
            raise SpaceError(f"{where}: values repeat")
        for value in self.values:
            if isinstance(value, str) and not re.fullmatch(_ID_VALUE, value):
                raise SpaceError(f"{where}: {value!r} may hold only letters, digits and . + -")

    @property
    def levels(self) -> list:
        return list(self.values)

    def index(self, value: Any) -> int:
        for i, candidate in enumerate(self.values):
            if candidate == value or str(candidate) == str(value):
                return i
        if all(isinstance(v, (int, float)) for v in self.values):
            numeric = np.asarray(self.values, dtype=float)
            target = _finite_or_none(value)
            if target is not None:
                return int(np.argmin(np.abs(numeric - target)))
        raise SpaceError(f"search_space.{self.name}: {value!r} is not one of {list(self.values)}")

    def to_unit(self, value: Any) -> float:
        if len(self.values) == 1:
            return 0.5
        return self.index(value) / (len(self.values) - 1)

    def from_unit(self, u: float) -> Any:
        u = min(max(float(u), 0.0), 1.0)
        return self.values[int(round(u * (len(self.values) - 1)))]

    def snap(self, value: Any) -> Any:
        return self.values[self.index(value)]

    def format(self, value: Any) -> str:
        return str(value)

    def parse(self, text: str) -> Any:
        for value in self.values:
            if str(value) == text:
                return value
        raise SpaceError(f"search_space.{self.name}: {text!r} is not one of {list(self.values)}")


@dataclass(frozen=True)
class FloatParam:
    """A real from ``low`` to ``high``, linear or on a log scale, kept to ``digits``
    significant digits."""

    name: str
    low: float
    high: float
    log: bool = False
    digits: int = 3

    def __post_init__(self) -> None:
        where = f"search_space.{self.name}"
        if not self.high > self.low:
            raise SpaceError(f"{where}: empty range, low {self.low} >= high {self.high}")
        if self.log and self.low <= 0:
            raise SpaceError(f"{where}.log: needs low > 0, got {self.low}")
        if not 1 <= self.digits <= 15:
            raise SpaceError(f"{where}.digits: must be 1..15, got {self.digits}")

    levels = None

    def to_unit(self, value: Any) -> float:
        return _scale_to_unit(float(value), self.low, self.high, self.log)

    def from_unit(self, u: float) -> float:
        return self.snap(_scale_from_unit(u, self.low, self.high, self.log))

    def snap(self, value: Any) -> float:
        value = min(max(_finite(self.name, value), self.low), self.high)
        snapped = _round_significant(value, self.digits)
        # Rounding may step just outside the range; the bounds themselves are valid values.
        return min(max(snapped, self.low), self.high)

    def format(self, value: Any) -> str:
        return f"{float(value):.{self.digits}g}"

    def parse(self, text: str) -> float:
        return float(text)


@dataclass(frozen=True)
class FixedParam:
    """A value that every trial of the study shares (e.g. alpha = 16 in experiment 2)."""

    name: str
    value: Any

    levels = None

    def snap(self, value: Any) -> Any:
        return self.value


Param = IntParam | ChoiceParam | FloatParam | FixedParam
TunableParam = IntParam | ChoiceParam | FloatParam


def _param_from_config(name: str, spec: Mapping[str, Any]) -> Param:
    where = f"search_space.{name}"
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{where}: expected a mapping with a 'type', got {spec!r}")
    kind = spec.get("type")
    allowed = {
        "int": {"type", "low", "high", "step", "log"},
        "choice": {"type", "values"},
        "float": {"type", "low", "high", "log", "digits"},
        "fixed": {"type", "value"},
    }
    if kind not in allowed:
        raise SpaceError(f"{where}.type: must be one of {sorted(allowed)}, got {kind!r}")
    unknown = set(spec) - allowed[kind]
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {sorted(unknown)} for type {kind}")
    try:
        if kind == "int":
            for key in ("low", "high", "step"):
                value = spec.get(key, 1)
                if isinstance(value, bool) or float(value) != int(value):
                    raise SpaceError(f"{where}.{key}: must be an integer, got {value!r}")
            return IntParam(
                name,
                int(spec["low"]),
                int(spec["high"]),
                int(spec.get("step", 1)),
                bool(spec.get("log", False)),
            )
        if kind == "choice":
            values = spec["values"]
            if not isinstance(values, Sequence) or isinstance(values, str):
                raise SpaceError(f"{where}.values: must be a list, got {values!r}")
            return ChoiceParam(name, tuple(values))
        if kind == "float":
            return FloatParam(
                name,
                float(spec["low"]),
                float(spec["high"]),
                bool(spec.get("log", False)),
                int(spec.get("digits", 3)),
            )
        return FixedParam(name, spec["value"])
    except KeyError as missing:
        raise SpaceError(f"{where}.{missing.args[0]}: missing") from None
    except (TypeError, ValueError) as bad:
        if isinstance(bad, SpaceError):
            raise
        raise SpaceError(f"{where}: {bad}") from None


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of parameters. The tunable ones span the unit cube ``[0, 1]^dim``."""

    params: tuple[Param, ...]
    tunable: tuple[TunableParam, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise SpaceError("search_space: parameter names repeat")
        tunable = tuple(p for p in self.params if not isinstance(p, FixedParam))
        if not tunable:
            raise SpaceError("search_space: no parameter to tune (all are fixed)")
        abbreviations = [_abbreviation(p.name) for p in tunable]
        if len(set(abbreviations)) != len(abbreviations):
            raise SpaceError(f"search_space: trial-id abbreviations collide: {abbreviations}")
        object.__setattr__(self, "tunable", tunable)

    @classmethod
    def from_config(cls, mapping: Mapping[str, Mapping[str, Any]]) -> "SearchSpace":
        if not isinstance(mapping, Mapping) or not mapping:
            raise SpaceError("search_space: must be a non-empty mapping of parameter names")
        for name in mapping:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(name)):
                raise SpaceError(f"search_space.{name}: names may hold only letters, digits and _")
        return cls(tuple(_param_from_config(str(n), spec) for n, spec in mapping.items()))

    # ---- names and sizes -------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def tunable_names(self) -> list[str]:
        return [p.name for p in self.tunable]

    @property
    def dim(self) -> int:
        return len(self.tunable)

    @property
    def fixed(self) -> dict[str, Any]:
        return {p.name: p.value for p in self.params if isinstance(p, FixedParam)}

    @property
    def cardinality(self) -> int | None:
        """How many distinct points there are, or None if a float makes it uncountable."""
        count = 1
        for p in self.tunable:
            if p.levels is None:
                return None
            count *= len(p.levels)
        return count

    def __getitem__(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    # ---- points ----------------------------------------------------------------------
    def snap(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The nearest valid point, with fixed values filled in."""
        out = {}
        for p in self.params:
            if isinstance(p, FixedParam):
                out[p.name] = p.value
            elif p.name not in point:
                raise SpaceError(f"point lacks parameter {p.name!r}")
            else:
                out[p.name] = p.snap(point[p.name])
        return out

    def key(self, point: Mapping[str, Any]) -> tuple:
        """A hashable identity of a point: equal keys mean the same trial."""
        snapped = self.snap(point)
        return tuple(snapped[p.name] for p in self.tunable)

    def to_unit(self, point: Mapping[str, Any]) -> np.ndarray:
        snapped = self.snap(point)
        return np.array([p.to_unit(snapped[p.name]) for p in self.tunable], dtype=float)

    def to_unit_rows(self, rows) -> np.ndarray:
        """Unit-cube rows, shape (n, dim), of a DataFrame or a list of points."""
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict("records")
        return np.array([self.to_unit(r) for r in rows], dtype=float).reshape(-1, self.dim)

    def from_unit(self, u: Sequence[float]) -> dict[str, Any]:
        u = np.asarray(u, dtype=float).ravel()
        if u.shape[0] != self.dim:
            raise ValueError(f"expected {self.dim} unit coordinates, got {u.shape[0]}")
        values = {p.name: p.from_unit(x) for p, x in zip(self.tunable, u)}
        return self.snap(values)

    def all_points(self) -> list[dict[str, Any]]:
        """Every point of a finite space, in lexicographic order of the tunable levels."""
        if self.cardinality is None:
            raise SpaceError("search_space: has a float parameter, so it has no finite list of points")
        grids = np.meshgrid(*[np.arange(len(p.levels)) for p in self.tunable], indexing="ij")
        indices = np.stack([g.ravel() for g in grids], axis=1)
        return [
            self.snap({p.name: p.levels[i] for p, i in zip(self.tunable, row)}) for row in indices
        ]

    # ---- trial ids -------------------------------------------------------------------
    def trial_id(self, point: Mapping[str, Any]) -> str:
        """``r64_a16_lr0.000316``: the tunable values, each behind its short name."""
        snapped = self.snap(point)
        return "_".join(f"{_abbreviation(p.name)}{p.format(snapped[p.name])}" for p in self.tunable)

    def parse_trial_id(self, trial_id: str) -> dict[str, Any]:
        parts = trial_id.split("_")
        if len(parts) != self.dim:
            raise SpaceError(f"trial id {trial_id!r} does not match the search space {self.tunable_names}")
        values = {}
        for p, part in zip(self.tunable, parts):
            prefix = _abbreviation(p.name)
            if not part.startswith(prefix):
                raise SpaceError(f"trial id {trial_id!r}: expected {prefix!r} for {p.name}")
            try:
                values[p.name] = p.parse(part[len(prefix) :])
            except ValueError:
                raise SpaceError(f"trial id {trial_id!r}: bad value for {p.name}") from None
        point = self.snap(values)
        if self.trial_id(point) != trial_id:
            raise SpaceError(f"trial id {trial_id!r} is not a point of the search space")
        return point

    @property
    def trial_id_pattern(self) -> str:
        """A regular expression matching this space's trial ids (a wildcard constraint)."""
        return "_".join(re.escape(_abbreviation(p.name)) + _ID_VALUE for p in self.tunable)

    def describe(self, point: Mapping[str, Any]) -> str:
        snapped = self.snap(point)
        return ", ".join(f"{p.name}={p.format(snapped[p.name])}" for p in self.tunable)

"""The proposer interface, the handling of history shared by every proposer, and the registry.

A proposer looks at the history of an arm (every trial so far, with its objective values or
its failure) and names the next ``n`` points to train. It never evaluates anything itself.
``propose`` is a pure function of (space, objectives, history, seed, n): every random draw
comes from a generator seeded by those, never from global state, so a rerun of a workflow
step proposes exactly the same trials.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import pandas as pd

from loratune.designs import spread_subset, unlisted_points
from loratune.pareto import SENSES, non_dominated, to_minimization
from loratune.space import SearchSpace

__all__ = [
    "AVAILABLE_PROPOSERS",
    "History",
    "LARGE_FRONT",
    "check_options",
    "has_large_front",
    "Proposer",
    "make_proposer",
    "positive_int",
    "random_new_points",
    "space_filling_new_points",
    "split_history",
    "fitting_history",
    "STOPPED_FITS",
    "STOPPED_FIT",
    "validate_objectives",
]

log = logging.getLogger(__name__)

Point = dict[str, Any]

# name -> "module:class"; the module is imported only when that proposer is made, because
# GPTune, GPy, pygmo, optuna and botorch take seconds to import.
_REGISTRY: dict[str, str] = {
    "random": "loratune.proposers.random:RandomProposer",
    "grid": "loratune.proposers.grid:GridProposer",
    "gptune": "loratune.proposers.gptune:GPTuneProposer",
    "optuna": "loratune.proposers.optuna:OptunaProposer",
    "botorch": "loratune.proposers.botorch:BotorchProposer",
}
AVAILABLE_PROPOSERS: tuple[str, ...] = tuple(_REGISTRY)

# Non-dominated observations of 3+ objectives past which a hypervolume acquisition, whose cost
# grows with the front, gives way to a cheaper one (botorch: qLogNParEGO; optuna's GP sampler:
# fewer QMC samples). Measured with 200 trials and 76 non-dominated: 31.6 s and 16.5 s otherwise.
LARGE_FRONT = 16
# How a proposer uses the trials early stopping stopped at a rung (status "stopped", objectives
# as measured at the highest rung reached): "full_budget" fits only trials that trained their
# whole budget (as BOHB's model does) and keeps the stopped ones as taken points; "highest_rung"
# fits every trial at its highest rung as if it were final. A stopped point is never proposed
# again either way. bench/early_stopping.py measured both with Optuna's GP on the two measured
# learning-curve tables (bench/results/early_stopping_b0c71cf_*, _7714e00_*; 10 seeds, rungs
# [1/3, 1], keep 1/2): highest_rung needed 0.80 and 0.56 of the no-early-stopping seconds for
# its hypervolume, full_budget 1.00 and 0.64, and was below it at equal seconds on less of the
# axis (14% and 19% against 25% and 50%). A stopped trial's rung values are worse than its final
# ones, but it stopped because it was worse than its round's others, so the model learns where
# not to look; fitted only on full-budget trials it sees one or two new trials a round.
STOPPED_FITS = ("full_budget", "highest_rung")
STOPPED_FIT = "highest_rung"
# A history column that marks a related task's rows (warm_start.transfer_history): fitted, not taken.
RELATED_COLUMN = "related_task"
# Random top-up draws this many candidates per missing point before it lists a finite space.
_DRAWS_PER_POINT = 50


def validate_objectives(objectives: Any) -> dict[str, str]:
    """A non-empty mapping of objective name to "min" or "max", as a plain dict."""
    if not isinstance(objectives, Mapping) or not objectives:
        raise ValueError(
            f"objectives: must be a non-empty mapping of name to 'min'/'max', got {objectives!r}"
        )
    for name, sense in objectives.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"objectives: names must be non-empty strings, got {name!r}")
        if sense not in SENSES:
            raise ValueError(f"objectives.{name}: must be one of {list(SENSES)}, got {sense!r}")
    return dict(objectives)


@dataclass(frozen=True)
class History:
    """A history split the way every proposer needs it."""

    ok_points: list[Point]  # rows with status ok and finite objectives, in history order
    X_unit: np.ndarray  # (n_ok, dim): their unit-cube coordinates
    Y_min: np.ndarray  # (n_ok, n_objectives): their objectives, "max" columns negated
    # Every row, failed ones included: never to be proposed again (by a proposer that pools a
    # related task's rows with this study's own; see Proposer.models_tasks).
    evaluated: list[Point]
    # Every row but a related task's (RELATED_COLUMN), whose points are yet to be measured on
    # this task: the rows never to be proposed again by a proposer that models the related task.
    taken: list[Point]
    # (n_ok,): whether each ok row is a related task's (warm_start.transfer_history marks them).
    ok_related: np.ndarray

    @property
    def related_ok(self) -> bool:
        return bool(self.ok_related.any())


def fitting_history(history: pd.DataFrame | None, stopped: str = STOPPED_FIT) -> pd.DataFrame | None:
    """The history a proposer is given: with ``stopped="highest_rung"`` the stopped rows count
    as results (status ok); with ``"full_budget"`` they stay ``stopped``, which ``split_history``
    keeps out of the fit and in the taken points, like a failure."""
    if stopped not in STOPPED_FITS:
        raise ValueError(f"stopped: must be one of {list(STOPPED_FITS)}, got {stopped!r}")
    if history is None or stopped == "full_budget" or "status" not in history.columns:
        return history
    return history.assign(status=history["status"].replace("stopped", "ok"))


def split_history(
    space: SearchSpace, objectives: Mapping[str, str], history: pd.DataFrame | None
) -> History:
    """Snap every row of ``history``; keep the ok rows for fitting and all rows as taken.

    A row is failed when its ``status`` (if there is that column) is not "ok" or when an
    objective is missing or not finite; a trial early stopping stopped at a rung (``stopped``)
    is kept out of the fit the same way unless ``fitting_history`` made it a result. A column that a non-empty history lacks is an error:
    a misspelt objective would otherwise turn every trial into a silent failure.
    """
    names = list(objectives)
    if history is None or len(history) == 0:
        return History([], np.empty((0, space.dim)), np.empty((0, len(names))), [], [], np.zeros(0, bool))
    if not isinstance(history, pd.DataFrame):
        raise ValueError(f"history: must be a pandas DataFrame, got {type(history).__name__}")
    for column in [*space.tunable_names, *names]:
        if column not in history.columns:
            raise ValueError(f"history: no column {column!r} (columns: {list(history.columns)})")
    for column in space.tunable_names:
        missing = history[column].isna().to_numpy()
        if missing.any():
            raise ValueError(f"history: row {int(np.argmax(missing))} has no value for {column!r}")

    values = history[names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(values).all(axis=1)
    if "status" in history.columns:
        ok &= (history["status"].astype(str) == "ok").to_numpy()

    evaluated = [space.snap(row) for row in history[space.tunable_names].to_dict("records")]
    ok_points = [point for point, good in zip(evaluated, ok) if good]
    Y_min = to_minimization(values[ok].reshape(-1, len(names)), [objectives[n] for n in names])
    related = np.zeros(len(history), bool)
    if RELATED_COLUMN in history.columns:
        related = history[RELATED_COLUMN].fillna(False).astype(bool).to_numpy()
    taken = [point for point, theirs in zip(evaluated, related) if not theirs]
    return History(ok_points, space.to_unit_rows(ok_points), Y_min, evaluated, taken, related[ok])


class Proposer(abc.ABC):
    """Proposes new points from a history; subclasses implement ``_candidates``.

    Subclasses name their options in a frozen dataclass ``Options``; its fields (with their
    defaults) are the only keyword options ``make_proposer`` accepts for that proposer.
    """

    name: ClassVar[str]
    #: Whether the proposer models a related task's rows (warm start) as another task: it may then
    #: measure their points here. One that pools them with this study's own rows takes them as
    #: observations of its own, not to be measured again.
    models_tasks: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(
        self, space: SearchSpace, objectives: Mapping[str, str], seed: int = 0, **options: Any
    ) -> None:
        if not isinstance(space, SearchSpace):
            raise ValueError(f"space: must be a SearchSpace, got {type(space).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
        self.space = space
        self.objectives = validate_objectives(objectives)
        self.seed = int(seed)
        self.options = _parse_options(self.name, self.Options, options)

    def propose(self, history: pd.DataFrame | None, n: int) -> list[Point]:
        """``n`` distinct snapped points that are not in ``history`` (fewer only when the
        space has no more), fixed parameters filled in."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n: must be an integer >= 0, got {n!r}")
        split = split_history(self.space, self.objectives, history)
        if n == 0:
            return []
        rng = self._rng(split, int(n))
        candidates = self._candidates(split, int(n), rng)
        return self._finalize(candidates, int(n), split.taken if self.models_tasks else split.evaluated, rng)

    @abc.abstractmethod
    def _candidates(self, history: History, n: int, rng: np.random.Generator) -> list[Point]:
        """Points in order of preference; they may repeat or be taken: the caller filters."""

    def _rng(self, history: History, n: int) -> np.random.Generator:
        # Seeded by the inputs, not by earlier calls, so one call's output never depends on
        # which calls came before it in this process.
        return np.random.default_rng([self.seed, len(history.evaluated), n])

    def _finalize(
        self,
        candidates: Iterable[Mapping[str, Any]],
        n: int,
        evaluated: list[Point],
        rng: np.random.Generator,
    ) -> list[Point]:
        """Snap, drop repeats and taken points, keep the first ``n``; top up with seeded
        random points when the candidates run short."""
        taken = {self.space.key(p) for p in evaluated}
        chosen: list[Point] = []
        for candidate in candidates:
            point = self.space.snap(candidate)
            key = self.space.key(point)
            if key not in taken:
                taken.add(key)
                chosen.append(point)
            if len(chosen) == n:
                return chosen
        missing = n - len(chosen)
        if missing:
            log.info("%s: %d point(s) short; adding seeded random points", self.name, missing)
            chosen += random_new_points(self.space, missing, taken, rng)
        return chosen


def has_large_front(Y_min: np.ndarray, limit: int = LARGE_FRONT) -> bool:
    """Whether ``Y_min`` has 3+ objectives and more than ``limit`` non-dominated rows."""
    return Y_min.shape[1] >= 3 and int(np.count_nonzero(non_dominated(Y_min))) > limit


def random_new_points(
    space: SearchSpace, n: int, taken: set[tuple], rng: np.random.Generator
) -> list[Point]:
    """Up to ``n`` points uniform in the unit cube (log-uniform for log parameters), snapped,
    whose keys are not in ``taken``; ``taken`` grows by the points returned."""
    chosen: list[Point] = []
    for u in rng.random((_DRAWS_PER_POINT * n + 100, space.dim)):
        point = space.from_unit(u)
        key = space.key(point)
        if key not in taken:
            taken.add(key)
            chosen.append(point)
            if len(chosen) == n:
                return chosen
    # The draws stopped finding new points: a finite space is nearly exhausted, so list the rest.
    for point in unlisted_points(space, taken, n - len(chosen), rng):
        taken.add(space.key(point))
        chosen.append(point)
    return chosen


def space_filling_new_points(
    space: SearchSpace, n: int, evaluated: list[Point], rng: np.random.Generator
) -> list[Point]:
    """Up to ``n`` new points spread by maximin distance from ``evaluated`` and each other,
    chosen among seeded random candidates."""
    taken = {space.key(p) for p in evaluated}
    pool = random_new_points(space, 20 * n, taken, rng)
    return spread_subset(space, pool, n, existing=evaluated, seed=int(rng.integers(2**31)))


def make_proposer(
    name: str,
    space: SearchSpace,
    objectives: Mapping[str, str],
    seed: int = 0,
    **options: Any,
) -> Proposer:
    """The proposer registered as ``name``, importing its module (and its heavy
    dependencies) only now."""
    return _proposer_class(name)(space, objectives, seed=seed, **options)


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise the one-line ``ValueError`` that ``make_proposer(name, ...)`` would raise for
    ``options``, without making a proposer: a config is checked before any job runs."""
    _parse_options(name, _proposer_class(name).Options, options)


def _proposer_class(name: str) -> type[Proposer]:
    if name not in _REGISTRY:
        raise ValueError(f"proposer: unknown {name!r}; choose one of {list(AVAILABLE_PROPOSERS)}")
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _parse_options(proposer: str, options_class: type, options: Mapping[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(options_class)]
    for key in options:
        if key not in fields:
            raise ValueError(
                f"proposer.{proposer}: unknown option {key!r}; choose one of {fields}"
            )
    return options_class(**options)


def positive_int(proposer: str, option: str, value: Any, minimum: int = 1) -> None:
    """Raise a one-line error unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"proposer.{proposer}.{option}: must be an integer >= {minimum}, got {value!r}")

"""Optuna's samplers as a proposer: the history is replayed into a fresh in-memory study,
then the sampler is asked for new trials.

Each proposal builds a study from scratch (so it depends on nothing but its inputs): every
ok row of the history becomes a COMPLETE trial with its values (``max`` objectives negated,
so every direction is ``minimize``), every failed row a FAIL trial with its parameters. The
asked trials stay RUNNING while the batch is built, so TPE's constant liar and the GP
sampler's pending-point acquisition spread a batch out instead of repeating one point.

Parameters keep the encoding that every other proposer's model sees: stepped integers as
integers on their step (or, for a log-scaled stepped integer, which Optuna cannot express,
as its unit coordinate), numeric choices as an ordinal index (alpha 4..256 is an ordered
scale, which a categorical distribution would throw away), other choices as categories,
floats on their (log) range. With ``coordinates: lora`` (or ``rslora``) the sampler sees
the LoRA-aware coordinates of ``loratune.proposers.coordinates`` instead: the update size
log(lr * alpha / rank) (alpha / sqrt(rank) for rsLoRA), log rank and log alpha.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from loratune.proposers.coordinates import COORDINATES, LoraCoordinates
from loratune.proposers.base import (
    History,
    Point,
    Proposer,
    has_large_front,
    positive_int,
    space_filling_new_points,
)
from loratune.space import ChoiceParam, FloatParam, IntParam, SearchSpace

__all__ = ["OptunaProposer", "SAMPLERS"]

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "gp", "nsga2")
# Asks per wanted point before the batch gives up on the sampler (it keeps landing on taken
# points) and the base class tops it up with random points.
_ASKS_PER_POINT = 4


class OptunaProposer(Proposer):
    """Optuna's TPE (its default), GP or NSGA-II sampler, driven through ask/tell."""

    name = "optuna"
    #: The GP sampler's hypervolume QMC samples set in the last proposal (None: Optuna's own).
    last_qmc_samples: int | None = None

    @dataclass(frozen=True)
    class Options:
        sampler: str = "tpe"
        # NSGA-II only: trials per generation. Optuna's default of 50 would leave a study of
        # a few dozen trials in its random first generation.
        population_size: int = 8
        # Fewer distinct successful points than this: a space-filling design instead (the
        # samplers' own start-up phase is plain random sampling, so it is skipped).
        min_points: int = 2
        # GP only: treat the objectives as noise-free (Optuna's ``deterministic_objective``):
        # the model interpolates every observation. Right for tabulated or analytic problems,
        # wrong for real training, whose losses and times vary from run to run.
        deterministic: bool = False
        # GP only: quasi-Monte Carlo samples of its log expected hypervolume improvement.
        # None: Optuna's 128, but 64 with 3+ objectives and more than ``LARGE_FRONT``
        # non-dominated trials, where the box decomposition of every sample dominates the
        # cost (a 3-objective proposal with 200 trials, 76 of them non-dominated: 16.5 s with
        # 128 samples, 5.4 s with 64, the same two points proposed).
        qmc_samples: int | None = None
        # The coordinates the sampler models: "raw" (each parameter on its own scale) or the
        # LoRA-aware "lora" / "rslora" ones (proposers/coordinates.py). "raw" is the default: on
        # both measured tables "lora" is ahead at 6 trials but behind from 8 on, and its mean
        # hypervolume over 16 trials is lower (10 seeds, bench/results/coordinates_10cda1b.md).
        coordinates: str = "raw"

        def __post_init__(self) -> None:
            if self.coordinates not in COORDINATES:
                raise ValueError(
                    f"proposer.optuna.coordinates: unknown {self.coordinates!r}; choose one of {list(COORDINATES)}"
                )
            if not isinstance(self.deterministic, bool):
                raise ValueError(f"proposer.optuna.deterministic: must be true or false, got {self.deterministic!r}")
            if self.qmc_samples is not None:
                positive_int("optuna", "qmc_samples", self.qmc_samples)
                if self.sampler != "gp":
                    raise ValueError("proposer.optuna.qmc_samples: only the gp sampler has it")
            if self.deterministic and self.sampler != "gp":
                raise ValueError("proposer.optuna.deterministic: only the gp sampler has it")
            if self.sampler not in SAMPLERS:
                raise ValueError(f"proposer.optuna.sampler: unknown {self.sampler!r}; choose one of {list(SAMPLERS)}")
            positive_int("optuna", "population_size", self.population_size, minimum=2)
            positive_int("optuna", "min_points", self.min_points, minimum=1)

    def _candidates(self, history: History, n: int, rng: np.random.Generator) -> list[Point]:
        distinct = len(np.unique(history.X_unit, axis=0)) if len(history.X_unit) else 0
        if distinct < self.options.min_points:
            log.info("optuna: %d distinct ok point(s); proposing a space-filling random design", distinct)
            return space_filling_new_points(self.space, n, history.evaluated, rng)

        import optuna

        encoding = _Encoding(self.space, self.options.coordinates)
        sampler_seed = int(rng.integers(2**31))
        with _quiet():
            sampler = self._sampler(sampler_seed, history)
            study = optuna.create_study(directions=["minimize"] * len(self.objectives), sampler=sampler)
            study.add_trials(self._replay(history, encoding, sampler))
            taken = {self.space.key(p) for p in history.evaluated}
            if self.space.cardinality is not None:
                # Asking for more points than a finite space has left only wastes searches.
                n = min(n, self.space.cardinality - len(taken))
            chosen: list[Point] = []
            for _ in range(_ASKS_PER_POINT * n):
                trial = study.ask(encoding.distributions)
                point = encoding.point(trial.params)
                key = self.space.key(point)
                # A repeat stays RUNNING: one more pending point for the sampler to avoid.
                if key not in taken:
                    taken.add(key)
                    chosen.append(point)
                    if len(chosen) == n:
                        break
        log.info("optuna (%s): %d ok trials, %d proposal(s)", self.options.sampler, len(history.ok_points), len(chosen))
        return chosen

    def _sampler(self, seed: int, history: History):
        import optuna

        if self.options.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=0)
        if self.options.sampler == "gp":
            sampler = optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=0, deterministic_objective=self.options.deterministic
            )
            self.last_qmc_samples = self._qmc_samples(history)
            if self.last_qmc_samples is not None:
                if hasattr(sampler, "_n_qmc_samples_ehvi"):
                    sampler._n_qmc_samples_ehvi = self.last_qmc_samples
                else:  # an Optuna without the attribute: its own sample count, however slow
                    log.warning("optuna: this Optuna's GP sampler has no QMC sample count to set; using its own")
                    self.last_qmc_samples = None
            return sampler
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=self.options.population_size)

    def _replay(self, history: History, encoding: "_Encoding", sampler) -> list:
        """The history as finished trials: ok rows COMPLETE with their minimization values,
        failed rows FAIL. NSGA-II rebuilds its generations from a system attribute, so ok
        trials are assigned to generations of ``population_size`` in history order."""
        import optuna
        from optuna.trial import TrialState

        generation_key = getattr(sampler, "_get_generation_key", None)
        ok_keys = [self.space.key(p) for p in history.ok_points]
        trials, next_ok = [], 0
        for point in history.evaluated:
            params = encoding.params(point)
            # ok_points is the ok subsequence of evaluated, in order.
            if next_ok < len(ok_keys) and self.space.key(point) == ok_keys[next_ok]:
                attrs = {}
                if generation_key is not None:
                    attrs[generation_key()] = next_ok // self.options.population_size
                trials.append(
                    optuna.trial.create_trial(
                        state=TrialState.COMPLETE,
                        values=history.Y_min[next_ok].tolist(),
                        params=params,
                        distributions=encoding.distributions,
                        system_attrs=attrs,
                    )
                )
                next_ok += 1
            else:
                trials.append(
                    optuna.trial.create_trial(
                        state=TrialState.FAIL, params=params, distributions=encoding.distributions
                    )
                )
        return trials

    def _qmc_samples(self, history: History) -> int | None:
        """The GP sampler's hypervolume QMC samples to set (None: leave Optuna's)."""
        if self.options.qmc_samples is not None:
            return self.options.qmc_samples
        if has_large_front(history.Y_min):
            return 64
        return None


class _Encoding:
    """Optuna distributions for the tunable parameters, and the maps to and from points."""

    def __init__(self, space: SearchSpace, coordinates: str = "raw") -> None:
        self.space = space
        self.distributions: dict[str, Any] = {}
        self._to_optuna: dict[str, Callable[[Any], Any]] = {}
        self._from_optuna: dict[str, Callable[[Any], Any]] = {}
        self._lora = None if coordinates == "raw" else LoraCoordinates(space, coordinates)
        if self._lora is not None:
            from optuna.distributions import FloatDistribution

            self.distributions = {
                name: FloatDistribution(low, high, log=True) for name, (low, high) in self._lora.bounds.items()
            }
            self.distributions.update({name: FloatDistribution(0.0, 1.0) for name in self._lora.unit_names})
            return
        for param in space.tunable:
            self._add(param)

    def _add(self, param) -> None:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        name = param.name
        identity = lambda value: value  # noqa: E731
        if isinstance(param, IntParam) and not (param.log and param.step > 1):
            self.distributions[name] = IntDistribution(param.low, param.high, step=param.step, log=param.log)
            self._to_optuna[name], self._from_optuna[name] = int, identity
        elif isinstance(param, IntParam):
            self.distributions[name] = FloatDistribution(0.0, 1.0)
            self._to_optuna[name], self._from_optuna[name] = param.to_unit, param.from_unit
        elif isinstance(param, ChoiceParam) and all(_is_number(v) for v in param.values):
            self.distributions[name] = IntDistribution(0, len(param.values) - 1)
            self._to_optuna[name] = param.index
            self._from_optuna[name] = lambda index, values=param.values: values[int(index)]
        elif isinstance(param, ChoiceParam):
            self.distributions[name] = CategoricalDistribution(list(param.values))
            self._to_optuna[name], self._from_optuna[name] = param.snap, identity
        elif isinstance(param, FloatParam):
            self.distributions[name] = FloatDistribution(param.low, param.high, log=param.log)
            self._to_optuna[name], self._from_optuna[name] = float, identity
        else:  # pragma: no cover - SearchSpace.tunable holds only the kinds above
            raise TypeError(f"search_space.{name}: no Optuna encoding for {type(param).__name__}")

    def params(self, point: Point) -> dict[str, Any]:
        if self._lora is not None:
            return self._lora.encode(point)
        return {name: encode(point[name]) for name, encode in self._to_optuna.items()}

    def point(self, params: dict[str, Any]) -> Point:
        if self._lora is not None:
            return self._lora.decode(params)
        return self.space.snap({name: decode(params[name]) for name, decode in self._from_optuna.items()})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna logs each study and trial at INFO and warns about experimental features; a
    proposal is a library call whose stdout/stderr may be a workflow's data channel, so
    only its errors get through, and warnings go to this module's debug log."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
    for warning in caught:
        log.debug("optuna: %s: %s", warning.category.__name__, warning.message)

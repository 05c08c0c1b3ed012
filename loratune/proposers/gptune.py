"""GPTune 2.0.0 as a proposer: its GP models and acquisition search, without its driver.

GPTune's own driver (``GPTune.MLA``) evaluates the objective itself, shares one model object
across all objectives (so every objective is searched with the last one's GP), runs an
unseeded search and writes ``gptune.db/`` into the working directory. Here the workflow
trains the trials, so only GPTune's pieces are used:

1. ``Problem`` and ``Data`` over a one-point task space, with the tunable parameters as
   GPTune's parameter space in the unit encoding of ``SearchSpace``;
2. one ``Model_GPy_LCM`` per objective, each trained on its own standardized column;
3. GPTune's ``SurrogateProblem`` (its expected improvement per objective) searched with
   pygmo: NSGA-II over the per-objective EIs for several objectives, then points spread over
   the non-dominated set; particle swarm on -EI for one objective. Batches come from the
   kriging believer: the picks are added to copies of the models with their predicted
   values, and the search runs again until there are ``n`` points.

Every pygmo algorithm and population is seeded, and GPy's restarts draw from a seeded global
numpy state that is restored afterwards, so proposals repeat exactly across processes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from loratune.designs import spread_subset
from loratune.proposers.base import (
    History,
    Point,
    Proposer,
    positive_int,
    space_filling_new_points,
)
from loratune.space import ChoiceParam, IntParam, SearchSpace

__all__ = ["GPTuneProposer"]

log = logging.getLogger(__name__)


def _import_gptune() -> dict[str, Any]:
    """GPTune's flat modules (``problem``, ``model``, ``search``...), set up to import."""
    import skopt.space

    from loratune.proposers import _autotune

    # GPTune was written against its own fork of scikit-optimize, whose dimensions carry an
    # ``optimize`` flag (only output dimensions' flags are read: all objectives optimize).
    skopt.space.Real.optimize = True
    skopt.space.Integer.optimize = True
    for name in ("autotune", "autotune.problem", "autotune.space"):
        sys.modules.setdefault(name, _autotune)
    import GPTune as package

    folder = os.path.dirname(package.__file__)
    # Its modules import one another by bare name ("from problem import Problem"); first on
    # the path so that no other top-level ``data`` or ``model`` module can stand in.
    if folder not in sys.path:
        sys.path.insert(0, folder)
    with _quiet_single_threaded():
        import computer
        import data
        import model
        import options
        import problem
        import search
    return {
        "Computer": computer.Computer,
        "Data": data.Data,
        "Model_GPy_LCM": model.Model_GPy_LCM,
        "Options": options.Options,
        "Problem": problem.Problem,
        "SurrogateProblem": search.SurrogateProblem,
    }


@contextlib.contextmanager
def _quiet_single_threaded() -> Iterator[None]:
    """GPTune and GPy print progress, and stdout may be a workflow's data channel: send it
    to stderr. GPy's random restarts start from extreme hyperparameters, whose overflow
    warnings are expected (such a restart just loses) and would only flood the log. One BLAS
    thread: on the tiny, ill-conditioned covariance matrices of a GP with near-zero noise,
    multithreaded OpenBLAS made a fit 30x slower (2.7 s vs 0.1 s for 30 points), and a
    single thread also keeps the float results the same from run to run."""
    with contextlib.redirect_stdout(sys.stderr), threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    """GPy draws its optimizer restarts from numpy's global generator: seed it for the
    duration, and give the caller's state back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


@functools.cache
def _level_index_class() -> type:
    """``_LevelIndex``, defined on first use: it subclasses scikit-optimize's ``Integer``, whose
    import takes about a second, and this module is also imported just to check options."""
    from loratune.proposers import _autotune

    class _LevelIndex(_autotune.Integer):
        """An ordinal index into a parameter's levels, encoded as the level's unit coordinate.

        GPTune then sees exactly ``SearchSpace.to_unit`` (log-scaled ranks included), and every
        candidate of its search is snapped to a level before its EI is taken, so the search never
        spends effort between two valid values.
        """

        def __init__(self, unit_levels: list[float], name: str) -> None:
            # skopt needs high > low; a single level is index 0 whatever the search asks for.
            super().__init__(0, max(len(unit_levels) - 1, 1), transform="normalize", name=name)
            self.unit_levels = np.asarray(unit_levels, dtype=float)

        def transform(self, X):
            return self.unit_levels[np.asarray(X, dtype=int)]

        def inverse_transform(self, Xt):
            Xt = np.asarray(Xt, dtype=float).reshape(-1, 1)
            return np.argmin(np.abs(Xt - self.unit_levels), axis=1).tolist()

    return _LevelIndex


def _parameter_space(space: SearchSpace):
    """GPTune's parameter space: a level index per stepped or choice parameter, else [0, 1]."""
    from loratune.proposers import _autotune

    dimensions = []
    for param in space.tunable:
        if isinstance(param, (IntParam, ChoiceParam)):
            units = [param.to_unit(level) for level in param.levels]
            dimensions.append(_level_index_class()(units, name=param.name))
        else:
            dimensions.append(_autotune.Real(0.0, 1.0, transform="normalize", name=param.name))
    return _autotune.Space(dimensions)


def _standardize(Y: np.ndarray) -> np.ndarray:
    """Each column to mean 0 and standard deviation 1 (a constant column to 0)."""
    scale = Y.std(axis=0)
    return (Y - Y.mean(axis=0)) / np.where(scale > 0, scale, 1.0)


def _merge_repeats(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per distinct input, with the mean of its outputs: the GP's noise is fixed
    near zero, so two different values at one input would make its covariance singular."""
    X_unique, inverse = np.unique(X, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    Y_mean = np.stack([Y[inverse == i].mean(axis=0) for i in range(len(X_unique))])
    return X_unique, Y_mean


class GPTuneProposer(Proposer):
    """Bayesian optimization with GPTune's GP models and expected improvement."""

    name = "gptune"

    @dataclass(frozen=True)
    class Options:
        # NSGA-II population / particle swarm size; NSGA-II needs a multiple of 4.
        population_size: int = 64
        generations: int = 50
        # GPy hyperparameter fits per objective: the first starts from GPy's defaults, the
        # others from seeded random values; the best likelihood wins.
        gp_restarts: int = 2
        gp_max_iters: int = 1000

        def __post_init__(self) -> None:
            positive_int("gptune", "population_size", self.population_size, minimum=8)
            if self.population_size % 4:
                raise ValueError(
                    "proposer.gptune.population_size: must be a multiple of 4 (NSGA-II), "
                    f"got {self.population_size}"
                )
            positive_int("gptune", "generations", self.generations)
            positive_int("gptune", "gp_restarts", self.gp_restarts)
            positive_int("gptune", "gp_max_iters", self.gp_max_iters)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gptune = _import_gptune()
        #: The per-objective models of the last proposal (GPTune ``Model_GPy_LCM``), in
        #: objective order; empty when the last proposal had too little data for a model.
        self.last_models: list[Any] = []
        #: Seconds spent on fitting the models and on searching, in the last proposal.
        self.last_timings: dict[str, float] = {}

    def _candidates(self, history: History, n: int, rng: np.random.Generator) -> list[Point]:
        self.last_models, self.last_timings = [], {}
        X, Y = history.X_unit, history.Y_min
        if len(X) > 0:
            X, Y = _merge_repeats(X, Y)
        if len(X) < 2 or np.all(Y.max(axis=0) == Y.min(axis=0)):
            log.info(
                "gptune: %d distinct ok point(s)%s; proposing a space-filling random design",
                len(X),
                ", all objectives constant" if len(X) >= 2 else "",
            )
            return space_filling_new_points(self.space, n, history.evaluated, rng)

        gp = _Gptune(self._gptune, self.space, list(self.objectives), self.options)
        taken = {self.space.key(p) for p in history.evaluated}
        with _quiet_single_threaded():
            started = time.perf_counter()
            self.last_models = gp.fit(X, _standardize(Y), rng)
            fitted = time.perf_counter()
            if len(self.objectives) > 1:
                points = gp.search_front(self.last_models, n, history.evaluated, taken, rng)
            else:
                points = gp.search_believer(self.last_models[0], n, taken, rng)
            searched = time.perf_counter()
        self.last_timings = {"fit_s": fitted - started, "search_s": searched - fitted}
        log.info(
            "gptune: %d ok points, %d objective(s): models %.2f s, search %.2f s",
            len(X),
            len(self.objectives),
            fitted - started,
            searched - fitted,
        )
        return points


class _Gptune:
    """GPTune's ``Problem``, ``Data``, models and ``SurrogateProblem`` for one proposal."""

    def __init__(
        self,
        modules: dict[str, Any],
        space: SearchSpace,
        objectives: list[str],
        options: GPTuneProposer.Options,
    ) -> None:
        from loratune.proposers import _autotune

        self.modules = modules
        self.space = space
        self.population_size = options.population_size
        self.generations = options.generations
        tuning = _autotune.TuningProblem(
            # GPTune tunes per task; a proposal is for one task, given by a dummy coordinate.
            _autotune.Space([_autotune.Real(0.0, 1.0, transform="normalize", name="task")]),
            _parameter_space(space),
            _autotune.Space([_autotune.Real(-np.inf, np.inf, name=o) for o in objectives]),
        )
        self.problem = modules["Problem"](tuning)
        self.computer = modules["Computer"](nodes=1, cores=2)
        self.options = modules["Options"](
            model_class="Model_GPy_LCM",
            model_restarts=options.gp_restarts,
            model_max_iters=options.gp_max_iters,
            model_threads=1,
            search_algo="nsga2" if len(objectives) > 1 else "pso",
            verbose=False,
        )
        self.task = np.zeros((1, 1))
        self.data = None

    def fit(self, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator) -> list[Any]:
        """One ``Model_GPy_LCM`` per column of ``Y``, each trained on that column only."""
        self.data = self._data(X, Y)
        models = []
        for o in range(Y.shape[1]):
            # A model object per objective: GPTune 2.0.0's driver shares one ([M] * DO).
            model = self.modules["Model_GPy_LCM"](problem=self.problem, computer=self.computer)
            with _seeded_global_numpy(int(rng.integers(2**31))):
                model.train(self._data(X, Y[:, [o]]), **self.options)
            models.append(model)
        return models

    def search_front(
        self,
        models: list[Any],
        n: int,
        evaluated: list[Point],
        taken: set[tuple],
        rng: np.random.Generator,
    ) -> list[Point]:
        """NSGA-II over the per-objective EIs; new points from its non-dominated front,
        spread by maximin distance. When one point maximizes every EI, the front is that
        point alone: then copies of the models believe their predictions at the picks and
        the search runs again, until ``n`` points."""
        import pygmo as pg

        believers = [self._believer(model) for model in models]
        existing = list(evaluated)
        chosen: list[Point] = []
        while len(chosen) < n:
            population = self._evolve(believers, rng)
            X, F = population.get_x(), population.get_f()
            front = pg.fast_non_dominated_sorting(F)[0][0]
            fresh = self._fresh([X[i] for i in front if np.all(np.isfinite(F[i]))], taken)
            seed = int(rng.integers(2**31))
            picked = spread_subset(self.space, fresh, n - len(chosen), existing=existing, seed=seed)
            if not picked:
                break
            chosen += picked
            existing += picked
            self._believe(believers, picked)
        return chosen

    def search_believer(
        self, model: Any, n: int, taken: set[tuple], rng: np.random.Generator
    ) -> list[Point]:
        """Particle swarm on -EI, ``n`` times; after each pick a copy of the model believes
        its own prediction there, which lowers EI around the pick."""
        believers = [self._believer(model)]
        chosen: list[Point] = []
        for _ in range(n):
            population = self._evolve(believers, rng)
            f = population.get_f()[:, 0]
            order = [i for i in np.argsort(f, kind="stable") if np.isfinite(f[i])]
            fresh = self._fresh([population.get_x()[i] for i in order], taken, first_only=True)
            if not fresh:
                break
            chosen += fresh
            self._believe(believers, fresh)
        return chosen

    def _believer(self, model: Any) -> Any:
        """A copy of ``model`` whose data can grow without touching the fitted one."""
        copy = self.modules["Model_GPy_LCM"](problem=self.problem, computer=self.computer)
        copy.M = model.M.copy()
        return copy

    def _believe(self, believers: list[Any], points: list[Point]) -> None:
        """The kriging believer: add each model's predicted mean at ``points`` to its data,
        hyperparameters kept; GPTune's EI then takes its incumbent from, and refuses, them."""
        X_new = self.space.to_unit_rows(points)
        predicted = np.column_stack(
            [[model.predict(x, tid=0)[0].item() for x in X_new] for model in believers]
        )
        X = np.vstack([self.data.P[0], X_new])
        Y = np.vstack([self.data.O[0], predicted])
        self.data = self._data(X, Y)
        for o, model in enumerate(believers):
            model.M.set_XY(X, Y[:, [o]])

    def _data(self, X: np.ndarray, Y: np.ndarray):
        return self.modules["Data"](self.problem, I=self.task, P=[X], O=[Y], D=[{}])

    def _evolve(self, models: list[Any], rng: np.random.Generator):
        """pygmo's NSGA-II (several objectives) or particle swarm (one) on GPTune's EI."""
        import pygmo as pg

        surrogate = self.modules["SurrogateProblem"](
            self.problem, self.computer, self.data, models, self.options, tid=0
        )
        make = pg.nsga2 if self.options["search_algo"] == "nsga2" else pg.pso
        algorithm = pg.algorithm(make(gen=self.generations, seed=int(rng.integers(2**31))))
        population = pg.population(
            pg.problem(surrogate), size=self.population_size, seed=int(rng.integers(2**31))
        )
        return algorithm.evolve(population)

    def _fresh(self, xs: list[np.ndarray], taken: set[tuple], first_only: bool = False) -> list[Point]:
        """Decision vectors of the search (GPTune's normalized space) as snapped points that
        are not in ``taken``, in order; ``taken`` grows by the points returned."""
        PS = self.problem.PS
        points: list[Point] = []
        for x in xs:
            unit = PS.transform(PS.inverse_transform(np.asarray(x, dtype=float).reshape(1, -1)))[0]
            point = self.space.from_unit(unit)
            key = self.space.key(point)
            if key not in taken:
                taken.add(key)
                points.append(point)
                if first_only:
                    break
        return points

"""Benchmark problems: cheap stand-ins for training, evaluated on the real LoRA search space.

The analytic problems (ZDT1, ZDT2, DTLZ2) have known Pareto fronts, so a proposer's front can
be scored against the truth. They read a point through ``space.to_unit``, so they see exactly
what a model sees: the rank on its step, alpha from its set, the learning rate on a log scale.
``lora_surrogate`` instead reads the hyperparameters themselves and returns the named metrics
a real trial reports, with LoRA-like trade-offs; it has no analytic front.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from loratune.space import ChoiceParam, IntParam, SearchSpace

__all__ = [
    "Problem",
    "CurveTable",
    "LoraSurrogate",
    "LoraTable",
    "SimulatedOutOfMemory",
    "TabulatedTrialFailed",
    "PROBLEMS",
    "get_problem",
    "evaluate",
    "problem_from_config",
    "step_budget",
    "synthetic_curve",
    "reference_point",
    "true_front",
]


@dataclass(frozen=True)
class Problem:
    """An analytic minimization problem on the unit cube with a known Pareto front."""

    name: str
    n_objectives: tuple[int, ...]  # the objective counts it is defined for
    description: str
    function: Callable[[np.ndarray, int], np.ndarray]  # f(u, m) -> m values
    front: Callable[[int, int], np.ndarray]  # (m, n_points) -> points on the true front
    reference: Callable[[int], np.ndarray]  # m -> reference point
    min_dim: Callable[[int], int]  # m -> fewest unit coordinates it needs

    def check(self, n_objectives: int, dim: int | None = None) -> None:
        if n_objectives not in self.n_objectives:
            raise ValueError(
                f"objectives: {self.name} is defined for {list(self.n_objectives)} objectives, "
                f"{n_objectives} configured"
            )
        if dim is not None and dim < self.min_dim(n_objectives):
            raise ValueError(
                f"benchmark.problem: {self.name} with {n_objectives} objectives needs at least "
                f"{self.min_dim(n_objectives)} tunable parameters, the search space has {dim}"
            )

    def evaluate(self, u, n_objectives: int) -> np.ndarray:
        """The m objective values (to minimize) at unit coordinates ``u``."""
        u = np.asarray(u, dtype=float).ravel()
        self.check(n_objectives, u.shape[0])
        return self.function(u, n_objectives)

    def true_front(self, n_points: int, n_objectives: int) -> np.ndarray:
        self.check(n_objectives)
        return self.front(n_objectives, n_points)

    def reference_point(self, n_objectives: int) -> np.ndarray:
        self.check(n_objectives)
        return self.reference(n_objectives)


# ---- ZDT1, ZDT2 (Zitzler, Deb & Thiele 2000) and DTLZ2 (Deb et al. 2002) ----------------


def _zdt_g(u: np.ndarray) -> float:
    return 1.0 + 9.0 * float(np.mean(u[1:]))


def _zdt1(u: np.ndarray, m: int) -> np.ndarray:
    g = _zdt_g(u)
    return np.array([u[0], g * (1.0 - math.sqrt(u[0] / g))])


def _zdt2(u: np.ndarray, m: int) -> np.ndarray:
    g = _zdt_g(u)
    return np.array([u[0], g * (1.0 - (u[0] / g) ** 2)])


def _dtlz2(u: np.ndarray, m: int) -> np.ndarray:
    g = float(np.sum((u[m - 1 :] - 0.5) ** 2))
    angles = u[: m - 1] * (math.pi / 2)
    f = np.full(m, 1.0 + g)
    for k in range(m):
        # f_k = (1+g) * cos(a_1)...cos(a_{m-1-k}) * sin(a_{m-k}), the last factor absent for k = 0.
        f[k] *= np.prod(np.cos(angles[: m - 1 - k]))
        if k > 0:
            f[k] *= math.sin(angles[m - 1 - k])
    return f


def _zdt1_front(m: int, n_points: int) -> np.ndarray:
    f1 = np.linspace(0.0, 1.0, n_points)
    return np.column_stack([f1, 1.0 - np.sqrt(f1)])


def _zdt2_front(m: int, n_points: int) -> np.ndarray:
    f1 = np.linspace(0.0, 1.0, n_points)
    return np.column_stack([f1, 1.0 - f1**2])


def _dtlz2_front(m: int, n_points: int) -> np.ndarray:
    """The unit sphere in the positive orthant: a quarter circle for two objectives; for
    three, the smallest simplex lattice (Das & Dennis) with at least ``n_points`` points,
    projected onto the sphere."""
    if m == 2:
        angle = np.linspace(0.0, math.pi / 2, n_points)
        return np.column_stack([np.cos(angle), np.sin(angle)])
    divisions = 1
    while math.comb(divisions + m - 1, m - 1) < n_points:
        divisions += 1
    # Stars and bars: m - 1 bars among divisions + m - 1 slots split the divisions m ways.
    weights = [np.diff([-1, *bars, divisions + m - 1]) - 1 for bars in combinations(range(divisions + m - 1), m - 1)]
    W = np.array(weights, dtype=float)
    return W / np.linalg.norm(W, axis=1, keepdims=True)


# ---- the LoRA surrogate ---------------------------------------------------------------

# Llama 3 8B, LoRA on every linear layer: per unit of rank, 32 layers x the (in + out) widths of
# q, k, v, o (4096 -> 4096, 1024, 1024, 4096) and gate, up, down (4096 <-> 14336).
_LORA_PARAMS_PER_RANK = 32 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
_GIB = 2.0**30


@dataclass(frozen=True)
class LoraSurrogate:
    """A noisy model of a QLoRA run of Llama 3 8B (one H200, 1.5 M training tokens).

    With rank ``r`` (default 16), alpha ``a`` (16), learning rate ``lr`` (2e-4) and dropout
    ``p`` (0.05), and ``d = log10(lr * a / r) - log10(4e-4)`` the distance of the effective
    LoRA step from its best value (the update is scaled by a / r):

    - ``final_train_loss = 1.05 + 0.10 (16 / r)^0.35 + L(d) + 0.25 p`` where
      ``L(d) = 0.9 (1 - exp(-(d / 1.2)^2))`` for ``d < 0`` (too small a step: under-trained,
      at worst near the base model's 2.0) and ``min(0.6 (d / 0.8)^2, 3)`` for ``d >= 0``
      (too large: unstable), so the loss is U-shaped in the log effective learning rate
      and a larger rank lowers it slightly;
    - ``train_loss`` (the mean over the run) ``= final + 0.25 max(2.0 - final, 0)``;
    - ``eval_loss = final + (0.04 + 0.005 log2(r / 4) + 0.03 max(d, 0)) (1 - min(p, 0.5))``:
      larger ranks and steps overfit more, dropout less;
    - ``trainable_params = 2,621,440 r``; ``peak_memory_gib = 24.1 + 16 bytes x
      trainable_params`` (fp32 adapter weights, gradients and two Adam moments);
    - ``tokens_per_second = 6300 (1 - 0.03 (r - 4) / 252) (0.98 if p > 0 else 1)`` (rank 4 to
      256 costs 3% of throughput, as measured on the H200), floored at half;
      ``train_time = 1.5e6 / tokens_per_second + 60`` seconds (loading and saving).

    With ``noise`` > 0 the losses and the throughput are multiplied by independent
    ``exp(noise z)`` and the memory by ``exp(noise z / 4)``, ``z ~ N(0, 1)`` drawn from a
    generator seeded by (seed, trial id), so the same trial always gives the same numbers;
    the time follows the noisy throughput and the parameter count is exact.
    """

    name: str = "lora_surrogate"
    description: str = "a noisy LoRA-like model of loss, time and memory (no analytic front)"
    metric_names: tuple[str, ...] = (
        "train_loss",
        "final_train_loss",
        "eval_loss",
        "train_time",
        "peak_memory_gib",
        "trainable_params",
        "tokens_per_second",
    )
    n_objectives: str = "any"

    def metrics(self, point: Mapping[str, Any], rng: np.random.Generator | None, noise: float) -> dict[str, float]:
        rank = float(point.get("lora_rank", 16))
        alpha = float(point.get("lora_alpha", 16))
        lr = float(point.get("learning_rate", 2e-4))
        dropout = float(point.get("lora_dropout", 0.05))
        for name, value in (("lora_rank", rank), ("lora_alpha", alpha), ("learning_rate", lr)):
            if not value > 0:
                raise ValueError(f"benchmark.problem: lora_surrogate needs {name} > 0, got {value}")
        d = math.log10(lr * alpha / rank) - math.log10(4e-4)
        if d < 0:
            misfit = 0.9 * (1.0 - math.exp(-((d / 1.2) ** 2)))
        else:
            misfit = min(0.6 * (d / 0.8) ** 2, 3.0)
        final = 1.05 + 0.10 * (16.0 / rank) ** 0.35 + misfit + 0.25 * dropout
        gap = (0.04 + 0.005 * math.log2(rank / 4.0) + 0.03 * max(d, 0.0)) * (1.0 - min(dropout, 0.5))
        train = final + 0.25 * max(2.0 - final, 0.0)
        params = _LORA_PARAMS_PER_RANK * rank
        memory = 24.1 + 16.0 * params / _GIB
        throughput = 6300.0 * max(1.0 - 0.03 * (rank - 4.0) / 252.0, 0.5) * (0.98 if dropout > 0 else 1.0)

        eval_loss = final + gap
        if noise > 0 and rng is not None:
            z = rng.standard_normal(5)
            final *= math.exp(noise * z[0])
            train *= math.exp(noise * z[1])
            eval_loss *= math.exp(noise * z[2])
            throughput *= math.exp(noise * z[3])
            memory *= math.exp(noise * z[4] / 4.0)
        return {
            "train_loss": train,
            "final_train_loss": final,
            "eval_loss": eval_loss,
            "train_time": 1.5e6 / throughput + 60.0,
            "peak_memory_gib": memory,
            "trainable_params": float(params),
            "tokens_per_second": throughput,
        }


class SimulatedOutOfMemory(RuntimeError):
    """The surrogate's stand-in for a CUDA out-of-memory crash."""


def _constant(value: float) -> Callable[[int], np.ndarray]:
    return lambda m: np.full(m, value)


PROBLEMS: dict[str, Problem | LoraSurrogate] = {
    "zdt1": Problem(
        "zdt1",
        (2,),
        "ZDT1: convex front f2 = 1 - sqrt(f1); f1 is the first unit coordinate",
        _zdt1,
        _zdt1_front,
        _constant(11.0),
        lambda m: 2,
    ),
    "zdt2": Problem(
        "zdt2",
        (2,),
        "ZDT2: concave front f2 = 1 - f1^2; f1 is the first unit coordinate",
        _zdt2,
        _zdt2_front,
        _constant(11.0),
        lambda m: 2,
    ),
    "dtlz2": Problem(
        "dtlz2",
        (2, 3),
        "DTLZ2: the front is the unit sphere in the positive orthant",
        _dtlz2,
        _dtlz2_front,
        _constant(1.1),
        lambda m: m,
    ),
    "lora_surrogate": LoraSurrogate(),
}


def get_problem(problem: str | Problem | LoraSurrogate) -> Problem | LoraSurrogate:
    if isinstance(problem, (Problem, LoraSurrogate, LoraTable, CurveTable)):
        return problem
    if problem not in PROBLEMS:
        raise ValueError(f"benchmark.problem: unknown {problem!r}; choose one of {list(PROBLEMS)}")
    return PROBLEMS[problem]


def _trial_rng(problem: str, seed: int, trial_id: str) -> np.random.Generator:
    """A generator fixed by (problem, seed, trial): re-running a trial repeats its noise."""
    digest = hashlib.sha256(f"{problem}|{seed}|{trial_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def evaluate(
    problem: str | Problem | LoraSurrogate,
    space: SearchSpace,
    point: Mapping[str, Any],
    objectives: Mapping[str, str],
    seed: int = 0,
    noise: float = 0.0,
    memory_limit_gib: float | None = None,
    step: int | None = None,
    max_steps: int | None = None,
    select: str = "best",
) -> dict[str, Any]:
    """A trial's metrics under a benchmark problem.

    With ``step`` (a rung), the trial as it stands after ``step`` of its ``max_steps`` steps
    under ``select`` (see ``synthetic_curve`` and ``CurveTable``), with ``steps``, ``max_steps``,
    ``best_step``, ``train_seconds`` (training seconds so far) and its ``curve``; without it the
    analytic problems and lora_surrogate answer as they always did. The ``table`` problem
    (a ``CurveTable``) always answers from its curves (no step: its full budget).

    Analytic problems: the i-th configured objective gets f_i, negated when its sense is
    "max" (so that maximizing it minimizes f_i); ``noise`` > 0 adds Gaussian noise of that
    standard deviation (the fronts span [0, 1] in every objective), seeded by (seed, trial).
    ``lora_surrogate``: all its named metrics, which must include the configured objectives;
    with ``memory_limit_gib``, a trial whose modelled peak memory exceeds it raises
    ``SimulatedOutOfMemory``, as a real run would crash (the caller records a failed trial).
    """
    spec = get_problem(problem)
    if not noise >= 0:
        raise ValueError(f"benchmark.noise: must be >= 0, got {noise!r}")
    if memory_limit_gib is not None and not (isinstance(spec, LoraSurrogate) and memory_limit_gib > 0):
        raise ValueError(
            f"benchmark.memory_limit_gib: must be > 0 and applies to lora_surrogate only, "
            f"got {memory_limit_gib!r} for {spec.name}"
        )
    for name, sense in objectives.items():
        if sense not in ("min", "max"):
            raise ValueError(f"objectives.{name}: sense must be 'min' or 'max', got {sense!r}")
    if select not in SELECT:
        raise ValueError(f"training.select: must be one of {list(SELECT)}, got {select!r}")
    if isinstance(spec, LoraTable):
        return _evaluate_table(spec, space, point, objectives, noise)
    point = space.snap(point)
    if isinstance(spec, CurveTable):
        if noise:
            raise ValueError(
                f"benchmark.noise: the table problem replays measured runs, so it must be 0, got {noise!r}"
            )
        return spec.answer(space, point, step, select, seed)
    if step is not None and not (max_steps and 0 < step <= max_steps):
        raise ValueError(f"step: must lie in 1..max_steps ({max_steps!r}), got {step!r}")
    rng = _trial_rng(spec.name, seed, space.trial_id(point)) if noise > 0 else None

    if isinstance(spec, LoraSurrogate):
        unknown = [name for name in objectives if name not in spec.metric_names]
        if unknown:
            raise ValueError(f"objectives: {unknown} not reported by {spec.name}; it reports {list(spec.metric_names)}")
        metrics = spec.metrics(point, rng, noise)
        if memory_limit_gib is not None and metrics["peak_memory_gib"] > memory_limit_gib:
            raise SimulatedOutOfMemory(
                f"{space.trial_id(point)}: modelled peak memory {metrics['peak_memory_gib']:.1f} GiB "
                f"exceeds benchmark.memory_limit_gib = {memory_limit_gib} GiB"
            )
        if step is None:
            return metrics
        full = metrics["train_time"]
        answer = _curve_answer(
            metrics,
            list(SURROGATE_CURVES),
            {},
            _lr_unit(space, point),
            step,
            max_steps,
            select,
            lambda t: _SURROGATE_SETUP_S + (full - _SURROGATE_SETUP_S) * t,
        )
        # A cost is compared as measured so far (the full run's time is what the budget buys).
        answer["train_time"] = answer["train_seconds"]
        return answer

    f = spec.evaluate(space.to_unit(point), len(objectives))
    if rng is not None:
        f = f + noise * rng.standard_normal(len(f))
    values = {name: float(-value if sense == "max" else value) for (name, sense), value in zip(objectives.items(), f)}
    if step is None:
        return values
    return _curve_answer(
        values,
        list(values),
        objectives,
        _lr_unit(space, point),
        step,
        max_steps,
        select,
        lambda t: ANALYTIC_SECONDS_PER_STEP * max_steps * t,
    )


def reference_point(problem: str | Problem | LoraSurrogate, n_objectives: int) -> np.ndarray:
    """The reference point for hypervolumes of ``problem`` in its minimization space."""
    return _analytic(problem).reference_point(n_objectives)


def true_front(problem: str | Problem | LoraSurrogate, n_objectives: int, n_points: int = 200) -> np.ndarray:
    """Points of the true Pareto front, shape (k, n_objectives), in minimization space."""
    return _analytic(problem).true_front(n_points, n_objectives)


def _analytic(problem) -> Problem:
    spec = get_problem(problem)
    if not isinstance(spec, Problem):
        raise ValueError(f"benchmark.problem: {spec.name} has no analytic Pareto front or reference point")
    return spec


# ---- lora_table: measured trials on a grid, answered by the nearest grid point ------------
#
# A benchmark made of real training runs: a grid over rank x alpha x learning rate, measured
# once on a GPU (SmolLM2-135M on instruction data), and replayed here at no cost. A trial is
# answered by the grid row nearest to it in the unit encoding of the search space (the
# encoding the proposers' models see), so the problem is piecewise constant between grid
# points and its true Pareto front is the front of the grid itself.

DEFAULT_LORA_GRID = Path(__file__).resolve().parents[1] / "bench" / "data" / "lora_grid.tsv"


class TabulatedTrialFailed(RuntimeError):
    """The grid point nearest to a trial failed when the grid was measured."""


@dataclass(frozen=True)
class LoraTable:
    """Measured LoRA trials from a TSV: a column per tuned parameter (named as in the search
    space), the metrics ``eval_loss``, ``train_loss``, ``train_time``, and optionally
    ``status`` (a row whose status is not ``ok`` is a failed run) and ``error``.

    Rows that lie outside the search space's ranges are not part of the problem. A metric
    that is empty or not a number is NaN, which a proposer treats as a failed trial.
    """

    path: str | Path = DEFAULT_LORA_GRID
    name: str = "lora_table"
    description: str = "measured SmolLM2-135M LoRA runs on a rank x alpha x lr grid (nearest grid point)"
    metric_names: tuple[str, ...] = ("eval_loss", "train_loss", "train_time")
    n_objectives: str = "any"

    def available(self) -> bool:
        return Path(self.path).is_file()

    def grid(self) -> pd.DataFrame:
        """The measured rows as read (cached until the file changes); never modify it."""
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(f"benchmark.problem: lora_table has no measured grid at {path}")
        return _read_grid(str(path), path.stat().st_mtime_ns, self.metric_names)

    def rows_in(self, space: SearchSpace) -> tuple[pd.DataFrame, np.ndarray]:
        """The rows inside ``space`` and their unit coordinates, shape (rows, space.dim)."""
        return rows_in_space(self.grid(), space, f"benchmark.problem: lora_table at {self.path}")

    def nearest(self, space: SearchSpace, point: Mapping[str, Any]) -> pd.Series:
        """The grid row nearest to ``point`` in the unit cube (the first of equally near ones)."""
        rows, U = self.rows_in(space)
        distances = np.linalg.norm(U - space.to_unit(point), axis=1)
        return rows.iloc[int(np.argmin(distances))]

    def metrics(self, space: SearchSpace, point: Mapping[str, Any]) -> dict[str, float]:
        """The measured metrics of the grid row nearest to ``point``; raises
        ``TabulatedTrialFailed`` when that run failed."""
        row = self.nearest(space, point)
        if "status" in row.index and str(row["status"]) != "ok":
            where = ", ".join(f"{name}={row[name]}" for name in space.tunable_names)
            error = row["error"] if "error" in row.index and isinstance(row["error"], str) else row["status"]
            raise TabulatedTrialFailed(f"{space.trial_id(point)}: the nearest measured run ({where}) failed: {error}")
        return {name: float(row[name]) for name in self.metric_names}

    def true_front(self, space: SearchSpace, objectives: Mapping[str, str]) -> np.ndarray:
        """The Pareto front of the ok rows inside ``space``, in minimization space."""
        from loratune.pareto import pareto_front, to_minimization

        rows, _ = self.rows_in(space)
        front = pareto_front(rows, objectives)
        return to_minimization(front[list(objectives)].to_numpy(dtype=float), list(objectives.values()))


def rows_in_space(table: pd.DataFrame, space: SearchSpace, what: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows of a measured ``table`` inside ``space``'s ranges and their unit coordinates,
    shape (rows, space.dim); ``what`` names the table in errors."""
    missing = [name for name in space.tunable_names if name not in table.columns]
    if missing:
        raise ValueError(f"{what} has no column(s) {missing} for the search space's parameters {space.tunable_names}")
    inside = np.ones(len(table), dtype=bool)
    for param in space.tunable:
        values = table[param.name]
        if param.levels is None or isinstance(param, IntParam):
            inside &= ((values >= param.low) & (values <= param.high)).to_numpy()
        else:
            inside &= values.map(lambda value, param=param: _is_choice(param, value)).to_numpy(dtype=bool)
    rows = table[inside]
    if rows.empty:
        raise ValueError(f"{what}: no row lies in the search space")
    U = np.array(
        [
            [param.to_unit(value) for param, value in zip(space.tunable, row)]
            for row in rows[space.tunable_names].itertuples(index=False)
        ],
        dtype=float,
    ).reshape(len(rows), space.dim)
    return rows, U


def _is_choice(param: ChoiceParam, value: Any) -> bool:
    """Whether a table cell is one of the choice's values (16.0 in a TSV is the value 16)."""
    for candidate in param.values:
        if str(candidate) == str(value):
            return True
        if isinstance(candidate, (int, float)) and not isinstance(candidate, bool):
            try:
                if math.isclose(float(value), candidate, rel_tol=1e-9):
                    return True
            except (TypeError, ValueError):
                pass
    return False


@functools.lru_cache(maxsize=4)
def _read_grid(path: str, mtime_ns: int, metric_names: tuple[str, ...]) -> pd.DataFrame:
    grid = pd.read_csv(path, sep="\t")
    missing = [name for name in metric_names if name not in grid.columns]
    if missing:
        raise ValueError(f"benchmark.problem: lora_table at {path} lacks metric column(s) {missing}")
    for name in metric_names:
        grid[name] = pd.to_numeric(grid[name], errors="coerce")
    return grid


def _evaluate_table(
    table: LoraTable, space: SearchSpace, point: Mapping[str, Any], objectives: Mapping[str, str], noise: float
) -> dict[str, float]:
    if noise:
        raise ValueError(f"benchmark.noise: lora_table replays measured runs, so it must be 0, got {noise!r}")
    unknown = [name for name in objectives if name not in table.metric_names]
    if unknown:
        raise ValueError(f"objectives: {unknown} not measured in lora_table; it has {list(table.metric_names)}")
    return table.metrics(space, point)


PROBLEMS["lora_table"] = LoraTable()


# ---- learning curves: a trial answered at a step of its budget ---------------------------
#
# Early stopping needs trials that can be stopped part-way. ``evaluate(..., step=s)`` answers a
# trial as it stands after s of its ``max_steps`` steps, under ``training.select`` (best: the
# lowest eval loss among the evaluations so far, with that evaluation's other values; last: the
# evaluation at s). The ``table`` problem replays measured learning curves; the analytic
# problems and lora_surrogate follow the synthetic curve model of ``synthetic_curve``.

SELECT = ("best", "last")
# The columns a learning-curve table must have besides the search-space parameters.
TABLE_COLUMNS = ("step", "max_steps", "eval_loss", "train_loss", "train_time", "trainable_params", "status")
TABLE_STATUSES = ("ok", "diverged")
# lora_surrogate's losses that follow the synthetic curve, and its set-up seconds (loading, saving).
SURROGATE_CURVES = ("eval_loss", "train_loss", "final_train_loss")
_SURROGATE_SETUP_S = 60.0
# Synthetic curves: training seconds per step of an analytic problem (it has no time of its own).
ANALYTIC_SECONDS_PER_STEP = 1.0
# How many evaluations a synthetic curve records over the budget (its values exist at every step).
SYNTHETIC_EVALUATIONS = 10


def synthetic_curve(t: float, lr_unit: float) -> float:
    """How far a trial is, after the fraction ``t`` of its budget, above its best value: the
    synthetic learning-curve model of the analytic problems and lora_surrogate.

    With the learning rate's unit coordinate ``l`` (0 the lowest of the space, 1 the highest;
    0.5 when the space has no learning rate), a trial is at its best at ``t_b = 1 - 0.6 l``:
    a low learning rate improves to the end, the highest peaks at 40% of the budget. Before
    ``t_b`` the gap is ``0.3 ln(t_b / t)`` (under-trained, falling), after it ``0.8 (t - t_b)``
    (overfitting, rising). So the best value along every curve is the problem's own value (its
    known front stays the truth under ``select: best``), early values favour high learning
    rates, and with ``select: last`` high learning rates end worse than their best.
    """
    if not 0 < t <= 1:
        raise ValueError(f"step: must lie in (0, max_steps], got the fraction {t!r}")
    best_at = 1.0 - 0.6 * float(lr_unit)
    return 0.3 * math.log(best_at / t) if t <= best_at else 0.8 * (t - best_at)


def _lr_unit(space: SearchSpace, point: Mapping[str, Any]) -> float:
    for param in space.tunable:
        if param.name == "learning_rate":
            return float(param.to_unit(point["learning_rate"]))
    return 0.5


def _synthetic_at(
    values: dict[str, float], curve_names: list[str], senses: Mapping[str, str], lr_unit: float, t: float
) -> dict[str, float]:
    """``values`` (a trial's best values) as they stand at fraction ``t``: the curve names get
    the synthetic gap in their direction of worse."""
    gap = synthetic_curve(t, lr_unit)
    return {
        k: v + (gap if senses.get(k, "min") == "min" else -gap) if k in curve_names else v for k, v in values.items()
    }


def _curve_answer(
    values: dict[str, float],
    curve_names: list[str],
    senses: Mapping[str, str],
    lr_unit: float,
    step: int,
    max_steps: int,
    select: str,
    seconds_at: Callable[[float], float],
) -> dict[str, Any]:
    """A synthetic trial at ``step``: its values under ``select`` and its recorded curve."""
    t = step / max_steps
    every = max(1, max_steps // SYNTHETIC_EVALUATIONS)
    steps = sorted({*range(every, step + 1, every), step})
    curve = []
    for s in steps:
        at = _synthetic_at(values, curve_names, senses, lr_unit, s / max_steps)
        curve.append({"step": s, **{k: at[k] for k in curve_names}, "train_time": seconds_at(s / max_steps)})
    best_at = 1.0 - 0.6 * lr_unit
    chosen_t = min(t, best_at) if select == "best" else t
    answer = _synthetic_at(values, curve_names, senses, lr_unit, chosen_t)
    answer.update(
        steps=step,
        max_steps=max_steps,
        best_step=max(1, int(round(chosen_t * max_steps))),
        train_seconds=seconds_at(t),
        curve=curve,
    )
    return answer


@dataclass(frozen=True)
class CurveTable:
    """Measured learning curves, one row per (run, evaluation step): the search-space parameter
    columns, ``TABLE_COLUMNS``, optionally ``peak_memory_gib``, other numeric metrics and a
    ``seed`` column that tells repeats of one point apart. JSONL (``.jsonl``/``.json``) or TSV.

    A run is the rows sharing the parameter values (and seed). A point is answered by its
    nearest measured point in the space's unit coordinates (repeats: the study seed picks one,
    ``seed mod repeats``); a rung at step s by the run's row at the largest measured step <= s.
    A ``diverged`` row at or before it makes the trial failed (with the cost up to there).
    """

    path: str
    name: str = "table"
    n_objectives: str = "any"

    @property
    def what(self) -> str:
        return f"benchmark.path: {self.path}"

    def rows(self) -> pd.DataFrame:
        """The table as read (cached until the file changes); never modify it."""
        path = Path(self.path)
        if not path.is_file():
            raise ValueError(f"{self.what}: no such learning-curve table")
        return _read_curve_table(str(path), path.stat().st_mtime_ns)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The numeric columns an objective may name (the parameters and step columns excluded)."""
        table = self.rows()
        skip = {"step", "max_steps", "status", "seed"}
        return tuple(c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c]))

    def check(self, space: SearchSpace, objectives: Mapping[str, str]) -> None:
        """Raise the one-line error a study with this table would meet in its first trial."""
        table = self.rows()
        self.points(space)  # the parameter columns, and a measured point inside the space
        unknown = [name for name in objectives if name not in self.metric_names or name in space.names]
        if unknown:
            metrics = [m for m in self.metric_names if m not in space.names]
            raise ValueError(f"{self.what}: objective(s) {unknown} are not metric columns; it has {metrics}")
        if table["max_steps"].nunique() != 1:
            raise ValueError(f"{self.what}: every row needs one and the same max_steps (the step budget)")

    @property
    def max_steps(self) -> int:
        return int(self.rows()["max_steps"].iloc[0])

    def points(self, space: SearchSpace) -> tuple[pd.DataFrame, np.ndarray]:
        """The distinct measured points inside ``space`` and their unit coordinates."""
        table = self.rows()
        missing = [name for name in space.tunable_names if name not in table.columns]
        if missing:
            raise ValueError(f"{self.what}: lacks the search-space parameter column(s) {missing}")
        distinct = table.drop_duplicates(space.tunable_names)[space.tunable_names].reset_index(drop=True)
        return rows_in_space(distinct, space, self.what)

    def run(self, space: SearchSpace, point: Mapping[str, Any], seed: int = 0) -> pd.DataFrame:
        """The measured run answering ``point``: its rows sorted by step."""
        points, U = self.points(space)
        nearest = points.iloc[int(np.argmin(np.linalg.norm(U - space.to_unit(point), axis=1)))]
        table = self.rows()
        same = np.ones(len(table), dtype=bool)
        for name in space.tunable_names:
            same &= (table[name] == nearest[name]).to_numpy()
        rows = table[same]
        if "seed" in rows.columns:
            repeats = sorted(rows["seed"].unique())
            rows = rows[rows["seed"] == repeats[seed % len(repeats)]]
        return rows.sort_values("step", kind="stable")

    def answer(
        self, space: SearchSpace, point: Mapping[str, Any], step: int | None, select: str, seed: int = 0
    ) -> dict[str, Any]:
        """The trial's metrics after ``step`` steps (None: the full budget) under ``select``."""
        run = self.run(space, point, seed)
        step = self.max_steps if step is None else int(step)
        reached = run[run["step"] <= step]
        if reached.empty:
            raise ValueError(
                f"{self.what}: the run nearest {space.trial_id(point)} has no evaluation at or before step {step}"
            )
        last = reached.iloc[-1]
        cost = {
            "steps": int(last["step"]),
            "max_steps": int(last["max_steps"]),
            "train_seconds": float(last["train_time"]),
        }
        curve = [
            {
                "step": int(r["step"]),
                "eval_loss": float(r["eval_loss"]),
                "train_loss": float(r["train_loss"]),
                "train_time": float(r["train_time"]),
            }
            for _, r in reached.iterrows()
        ]
        diverged = reached[reached["status"] == "diverged"]
        if len(diverged):
            at = int(diverged["step"].iloc[0])
            return {"status": "failed", "error": f"diverged at step {at} (measured)", "curve": curve, **cost}
        if select == "best":
            chosen = reached.iloc[int(np.argmin(reached["eval_loss"].to_numpy(dtype=float)))]
        else:
            chosen = last
        metrics = {name: float(chosen[name]) for name in self.metric_names if name not in space.names}
        return {**metrics, **cost, "best_step": int(chosen["step"]), "curve": curve}


@functools.lru_cache(maxsize=8)
def _read_curve_table(path: str, mtime_ns: int) -> pd.DataFrame:
    what = f"benchmark.path: {path}"
    try:
        if path.endswith((".jsonl", ".json")):
            table = pd.read_json(path, lines=True)
        else:
            table = pd.read_csv(path, sep="\t")
    except ValueError as error:
        raise ValueError(f"{what}: not a readable JSONL/TSV table ({str(error).strip()})") from None
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: lacks column(s) {missing}")
    bad = sorted(set(table["status"].astype(str)) - set(TABLE_STATUSES))
    if bad:
        raise ValueError(f"{what}: status must be one of {list(TABLE_STATUSES)}, found {bad}")
    for column in ("step", "max_steps"):
        if not pd.api.types.is_integer_dtype(table[column]):
            raise ValueError(f"{what}: column {column!r} must hold whole step counts")
    return table


def problem_from_config(benchmark: Mapping[str, Any]):
    """The problem a config's ``benchmark`` section names (``table`` reads ``benchmark.path``)."""
    if benchmark["problem"] == "table":
        if not benchmark.get("path"):
            raise ValueError("benchmark.path: the table problem needs the path of a learning-curve table")
        return CurveTable(str(benchmark["path"]))
    return get_problem(benchmark["problem"])


def step_budget(problem, training_max_steps: int) -> int:
    """A trial's full step budget: a table's own ``max_steps``, else ``training.max_steps``."""
    spec = get_problem(problem)
    return spec.max_steps if isinstance(spec, CurveTable) else int(training_max_steps)

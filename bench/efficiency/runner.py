"""One benchmark run (a pilot, then an arm's rounds up to a budget) through the pipeline's own
round step (``loratune.loop.next_proposals``), its hypervolume against the true front, and the
proposal timing."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from loratune.config import Arm as ArmSpec
from loratune.designs import pilot_design
from loratune.loop import next_proposals
from loratune.pareto import REFERENCE, hypervolume, normalize
from loratune.proposers import make_proposer
from loratune.space import SearchSpace

from bench.efficiency.problems import BENCH_PROBLEMS, SPACE, BenchProblem


@dataclass(frozen=True)
class Arm:
    label: str
    proposer: str
    options: str = "{}"  # JSON, so that an arm pickles and prints as it was given

    @property
    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.options)

    def spec(self, batch_size: int) -> ArmSpec:
        """The arm as the workflow's config gives it to the round step."""
        return ArmSpec(self.label, self.proposer, 0, batch_size, self.kwargs)


ARMS = {
    a.label: a
    for a in (
        Arm("random", "random"),
        Arm("grid", "grid"),
        Arm("gptune", "gptune"),
        Arm("optuna-tpe", "optuna", '{"sampler": "tpe"}'),
        Arm("optuna-gp", "optuna", '{"sampler": "gp"}'),
        Arm("optuna-nsga2", "optuna", '{"sampler": "nsga2"}'),
        Arm("botorch", "botorch"),
        Arm("botorch-lora", "botorch", '{"coordinates": "lora"}'),
    )
}
# Rough seconds per proposal, to start the slow runs first and keep both workers busy.
_COST = {"gptune": 3.0, "botorch": 3.0, "optuna": 1.0}


@dataclass(frozen=True)
class Plan:
    seeds: int
    pilot: int
    batch: int
    budget: int


@dataclass(frozen=True)
class Task:
    problem: str
    arm: Arm
    seed: int
    plan: Plan

    @property
    def cost(self) -> float:
        sampler = self.arm.kwargs.get("sampler")
        return (
            _COST.get(self.arm.proposer, 0.01)
            * (3.0 if sampler == "gp" else 1.0)
            * (2.0 if self.problem == "dtlz2" else 1.0)
        )


# ---- one run: a pilot, then an arm's rounds up to the budget -------------------------------


def run_task(task: Task, related: pd.DataFrame | None = None, transfer: str | None = None) -> list[dict]:
    """Every trial of one (problem, arm, seed): parameters, observed and noise-free values.
    ``related``: a related task's rows that every round's proposer fits as ``transfer`` says
    (``loratune.warm_start``); ``task.plan.pilot`` may then be 0."""
    problem = BENCH_PROBLEMS[task.problem]
    space = problem.space
    names = list(problem.objectives)
    history: list[dict] = []
    rows: list[dict] = []

    def record(points: list[dict], round_: int, seconds: float) -> None:
        for point in points:
            observed, truth = problem.observe(space, point, task.seed)
            ok = observed is not None
            history.append({**point, **(observed or {n: np.nan for n in names}), "status": "ok" if ok else "failed"})
            rows.append(
                {
                    "problem": task.problem,
                    "arm": task.arm.label,
                    "seed": task.seed,
                    "n_trials": len(history),
                    "round": round_,
                    "trial_id": space.trial_id(point),
                    "status": history[-1]["status"],
                    **{f"true_{n}": (truth[i] if ok else np.nan) for i, n in enumerate(names)},
                    "propose_s": seconds / max(len(points), 1),
                }
            )

    record(pilot_design(space, task.plan.pilot, "lhs", task.seed), 0, 0.0)
    round_ = 0
    while len(history) < task.plan.budget:
        round_ += 1
        started = time.perf_counter()
        points = next_proposals(
            space,
            problem.objectives,
            task.arm.spec(task.plan.batch),
            pd.DataFrame(history),
            task.seed,
            round_,
            n=min(task.plan.batch, task.plan.budget - len(history)),
            related=related,
            transfer=transfer,
        )
        record(points, round_, time.perf_counter() - started)
        if not points:
            break
    return rows


# ---- hypervolume relative to the true front -------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """The true front's normalization and its hypervolume."""

    lower: np.ndarray
    upper: np.ndarray
    front_volume: float

    @classmethod
    def of(cls, front: np.ndarray) -> "Scale":
        """An analytic problem's: the true front's ideal point -> 0, its nadir -> 1."""
        return cls._bounded(front, front.min(axis=0), front.max(axis=0))

    @classmethod
    def of_table(cls, front: np.ndarray, runs: np.ndarray) -> "Scale":
        """A measured table's: per objective the front's best value -> 0 and the larger of the
        front's worst value and the median over all of the table's runs -> 1. A table's front
        is narrow (the rank barely moves the loss: on the self-instruct curve table the front's
        losses span 0.01), so the front's own bounds would leave every run that is not one of
        its few points outside the reference box, and every search at 0 until it hits one; with
        the median run at 1, a search's progress from an ordinary run to the front shows."""
        return cls._bounded(front, front.min(axis=0), np.maximum(front.max(axis=0), np.median(runs, axis=0)))

    @classmethod
    def _bounded(cls, front: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> "Scale":
        ref = np.full(front.shape[1], REFERENCE)
        return cls(lower, upper, hypervolume(normalize(front, lower, upper), ref))

    def ratios(self, Y_min: np.ndarray) -> list[float]:
        """Hypervolume of the first k rows over the front's, for every k (NaN rows add nothing)."""
        ref = np.full(Y_min.shape[1], REFERENCE)
        Y = normalize(Y_min, self.lower, self.upper)
        out, current = [], 0.0
        for k in range(len(Y)):
            if np.isfinite(Y[k]).all() and (Y[k] < ref).all():
                seen = Y[: k + 1]
                current = hypervolume(seen[np.isfinite(seen).all(axis=1)], ref) / self.front_volume
            out.append(current)
        return out


def scale_of(problem: BenchProblem) -> Scale:
    """The hypervolume scale a bench measures ``problem`` on: ``Scale.of_table`` for a measured
    table, ``Scale.of`` (the true front's own bounds) for an analytic problem."""
    space = problem.space
    front, runs = problem.front(space), problem.runs(space)
    return Scale.of(front) if runs is None else Scale.of_table(front, runs)


def add_hypervolume(trials: pd.DataFrame, scales: dict[str, Scale]) -> pd.DataFrame:
    parts = []
    for (problem, _arm, _seed), run in trials.groupby(["problem", "arm", "seed"], sort=False):
        run = run.sort_values("n_trials").copy()
        names = list(BENCH_PROBLEMS[problem].objectives)
        run["hv_ratio"] = scales[problem].ratios(run[[f"true_{n}" for n in names]].to_numpy(dtype=float))
        parts.append(run)
    return pd.concat(parts, ignore_index=True)


# ---- proposal time with a long history ------------------------------------------------------


def measure_timing(arms: list[Arm], history_size: int, batch: int) -> pd.DataFrame:
    """Seconds of one proposal per arm on a history of ``history_size`` random trials, for a
    2-objective (zdt1) and a 3-objective (dtlz2) problem."""
    logging.disable(logging.WARNING)
    space = SearchSpace.from_config(SPACE)
    load = os.getloadavg()[0]
    rows = []
    timed = (BENCH_PROBLEMS["zdt1"], BenchProblem("dtlz2", "dtlz2", {"f1": "min", "f2": "min", "f3": "min"}))
    for problem in timed:
        problem_name = problem.name
        points = pilot_design(space, history_size, "random", seed=123)
        history = pd.DataFrame([{**p, **problem.observe(space, p, 0)[0]} for p in points])
        for arm in arms:
            proposer = make_proposer(arm.proposer, space, problem.objectives, seed=1, **arm.kwargs)
            proposer.propose(history.iloc[:8], batch)  # imports and first-call set-up
            started = time.perf_counter()
            proposer.propose(history, batch)
            seconds = time.perf_counter() - started
            print(f"timing: {arm.label} on {problem_name} with {history_size} trials: {seconds:.2f} s", flush=True)
            rows.append(
                {
                    "arm": arm.label,
                    "problem": problem_name,
                    "objectives": len(problem.objectives),
                    "history": history_size,
                    "n": batch,
                    "seconds": seconds,
                    "load_average": load,
                }
            )
    return pd.DataFrame(rows)


def _run_tagged(task: Task) -> tuple[Task, list[dict]]:
    return task, run_task(task)


def _quiet_worker(log_path: str) -> None:
    """Keep the progress lines readable: GPy and GPTune print and warn on every fit (an
    error still reaches the main process with the failed task)."""
    logging.disable(logging.WARNING)
    sys.stdout = sys.stderr = open(log_path, "a", buffering=1)

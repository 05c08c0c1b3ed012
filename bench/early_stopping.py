"""Early stopping: how many training seconds successive halving saves, per proposer.

Each proposer runs per seed after the same Latin-hypercube pilot (trained to the full budget,
its cost shared and left out), as one arm with the same ``--batch`` trials per round, twice:
without early stopping ('full': ``--rounds`` rounds, every trial trained to the full budget --
the arm's full budget), and with it ('es<i>', one per schedule of ``--schedules``: the same
rounds of ``--batch`` trials through the schedule's rungs, round after round until it has spent
as many training seconds as 'full'). Every trial is answered by
``loratune.benchmarks.evaluate(..., step=...)`` (the ``table`` problem for measured
learning-curve tables, searched over the table's own levels; the synthetic curves for the
analytic problems), proposals come from ``loratune.loop.next_proposals`` and the rungs from
``loratune.early_stopping.successive_halving`` -- the pipeline's own code.

Hypervolume counts every trial at its recorded values as ``pareto.hypervolume_curves`` does: a
stopped trial at the highest rung it reached (``training.select: best``: its best checkpoint up
to there), a promoted one replacing its earlier rung's values. Normalization (``Scale.of_table``
of bench/efficiency/runner.py, the warm-start bench's too), per objective in minimization form: 0
at the true front's best value, 1 at the larger of the front's worst value and the median over
all the problem's full-budget runs (a table's: its measured runs, each at its best checkpoint);
reference point 1.1 in these units, a point beyond it adds nothing; divided by the true front's
hypervolume. Read against the arm's own cumulative training seconds, every rung's segment
counted, in three accountings (``ACCOUNTINGS``): as the table recorded them; in steady state
(each measured run's one-off start cost, which the first trial of each measuring process
carries, taken out: what a study pays when its trials share a worker process); and steady plus
a start cost per training segment (a process per trial and per rung). The goal check (issue
13), judged on the steady accounting: the seconds the early-stopping arm needs to reach the
hypervolume 'full' reaches at its full budget, as a fraction of the seconds 'full' spent
(median over seeds; <= 1/3 meets the goal), and whether at equal seconds its median curve is
ever below. An early-stopping run ends once it has reached that hypervolume (its curve could
only rise, 'full''s never exceeds it), which changes no result.

Run from the repository root, one measured table at a time (about 20 minutes each on 2 loaded
cores; the commands of bench/results/early_stopping_b0c71cf_*.md and _7714e00_*.md):

    .venv/bin/python bench/early_stopping.py --seeds 10 --problems "" \
        --tables bench/data/curves_self_instruct.jsonl --proposers optuna-gp --rounds 2 --batch 6 \
        --schedules '[[[0.333,1.0],0.5],[[0.167,0.5,1.0],0.334]]' --model-schedules 2 \
        --fits full_budget --options '{"optuna-gp": {"qmc_samples": 16}}' --workers 1

``--make-table PATH`` writes a synthetic learning-curve table from lora_surrogate (for
development) and exits.
"""

from __future__ import annotations

if __package__:  # imported as bench.<script>
    from bench._preamble import REPO
else:  # run as python bench/<script>.py
    from _preamble import REPO

import argparse  # noqa: E402
import os  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Mapping  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.efficiency.problems import SPACE  # noqa: E402
from bench.efficiency.runner import Scale, _quiet_worker  # noqa: E402
from loratune.benchmarks import CurveTable, evaluate, get_problem, true_front  # noqa: E402
from loratune.config import Arm  # noqa: E402
from loratune.designs import pilot_design  # noqa: E402
from loratune.early_stopping import (  # noqa: E402
    STOPPED,
    EarlyStopping,
    multi_fidelity_final,
    predict_final,
    promotion,
    rung_results,
    successive_halving,
)
from loratune.loop import next_proposals  # noqa: E402
from loratune.pareto import (
    REFERENCE,
    RESULT_STATUSES,
    hypervolume,
    normalize,
    pareto_front,
    to_minimization,
)  # noqa: E402
from loratune.space import SearchSpace  # noqa: E402

RESULTS = REPO / "bench" / "results"
DEFAULT_PROPOSER = "optuna-gp"
PROPOSERS = {
    "random": ("random", {}),
    "optuna-gp": ("optuna", {"sampler": "gp"}),
    "optuna-tpe": ("optuna", {"sampler": "tpe"}),
    "botorch": ("botorch", {}),
    "gptune": ("gptune", {}),
}
# The objectives of the tables (a loss and a cost the hyperparameters move) and of the surrogate.
TABLE_OBJECTIVES = {"eval_loss": "min", "trainable_params": "min"}
TWO = {"f1": "min", "f2": "min"}
# How a run's training seconds are counted (the column of its events): as the table recorded
# them; in steady state (each run's start cost taken out: paid once per study when its trials
# share a worker process); and steady plus a start cost for every training segment (a process
# per trial and per rung, as the workflow's train_trial / train_rung jobs are today).
ACCOUNTINGS = {"recorded": "seconds", "steady": "steady_seconds", "per_process": "process_seconds"}


@dataclass(frozen=True)
class Problem:
    name: str
    problem: str  # a name of loratune.benchmarks, or a table path
    objectives: Mapping[str, str]
    max_steps: int  # the synthetic problems' budget (a table has its own)

    def spec(self):
        return CurveTable(self.problem) if self.problem.endswith((".jsonl", ".json", ".tsv")) else self.problem

    def budget(self) -> int:
        spec = self.spec()
        return spec.max_steps if isinstance(spec, CurveTable) else self.max_steps

    def space(self) -> SearchSpace:
        """A table is searched over its own measured levels (every proposal is a measured run,
        none a repeat of its nearest neighbour); the synthetic problems over the study's space."""
        spec = self.spec()
        if not isinstance(spec, CurveTable):
            return SearchSpace.from_config(SPACE)
        rows = spec.rows()
        return SearchSpace.from_config(
            {name: {"type": "choice", "values": sorted(rows[name].unique().tolist())} for name in SPACE}
        )

    def answer(self, space: SearchSpace, point: dict, step: int, seed: int) -> dict:
        """The trial after ``step`` steps; ``steady_seconds``: its training seconds without the
        start cost its measured run carried (``start_costs``; the same as ``train_seconds`` for
        the synthetic problems)."""
        metrics = evaluate(self.spec(), space, point, self.objectives, seed=seed, step=step, max_steps=self.budget())
        spec = self.spec()
        start = 0.0
        if isinstance(spec, CurveTable):
            first = spec.run(space, point, seed).iloc[0]
            start = _start_costs(self.problem)[tuple(first[c] for c in _run_keys(spec))]
        return {**metrics, "steady_seconds": float(metrics["train_seconds"]) - start}

    def start_cost(self) -> float:
        """The start cost a process pays before its steady state: the median of the table's runs
        that carried one (more than 1 s; 0 for the synthetic problems)."""
        costs = np.array(list(_start_costs(self.problem).values())) if isinstance(self.spec(), CurveTable) else []
        carried = costs[costs > 1.0] if len(costs) else costs
        return float(np.median(carried)) if len(carried) else 0.0

    def scale(self) -> Scale:
        """Hypervolume's scale (``Scale.of_table`` with the problem's runs): per objective 0 at the true
        front's best value, 1 at the larger of the front's worst value and the median of every
        run of the problem at the full budget, the reference point 1.1 beyond. The true front and
        the runs: a table's measured runs (select best: each run's best checkpoint), the 4000
        random points of the surrogate; an analytic problem's front alone."""
        space = self.space()
        spec = get_problem(self.spec())
        if isinstance(spec, CurveTable):
            points, _ = spec.points(space)
            candidates = [space.snap(p) for p in points.to_dict("records")]
        elif self.problem == "lora_surrogate":
            candidates = pilot_design(space, 4000, "random", 0)
        else:
            return Scale.of(true_front(self.problem, len(self.objectives), 2001))
        rows = pd.DataFrame([{"status": "ok", **self.answer(space, p, self.budget(), 0)} for p in candidates])
        senses = list(self.objectives.values())
        every = to_minimization(rows[list(self.objectives)].to_numpy(dtype=float), senses)
        front = to_minimization(
            pareto_front(rows, self.objectives)[list(self.objectives)].to_numpy(dtype=float), senses
        )
        return Scale.of_table(front, every)


def _run_keys(spec: CurveTable) -> list[str]:
    return [c for c in (*SPACE, "seed") if c in spec.rows().columns]


@functools.lru_cache(maxsize=8)
def _start_costs(path: str) -> dict[tuple, float]:
    """A table's one-off start cost per measured run: how much longer its first evaluation
    interval took than its later ones at their median seconds per step (at least 0). The tables
    were measured by 12 worker processes sharing one GPU, each running trial after trial: the
    first trial of every process carries the process's kernel compilation and warm-up inside
    ``train_time`` (measured around each step), 12-22 s, the others none (24 of 128 runs per
    table). Keyed by the run's parameter values and seed."""
    spec = CurveTable(path)
    out = {}
    for key, run in spec.rows().groupby(_run_keys(spec), sort=False):
        run = run.sort_values("step")
        steps, seconds = run["step"].to_numpy(dtype=float), run["train_time"].to_numpy(dtype=float)
        if len(run) < 2 or not np.isfinite(seconds).all():
            out[key] = 0.0
            continue
        per_step = np.median(np.diff(seconds) / np.diff(steps))
        out[key] = max(0.0, float(seconds[0] - per_step * steps[0]))
    return out


@dataclass(frozen=True)
class Task:
    problem: Problem
    proposer: str
    variant: str  # "full" (no early stopping), "es<i>" (schedule i, default fit) or "es<i>-<fit>"
    seed: int
    args: dict  # the plan (pickles into the workers)


def run_task(task: Task) -> list[dict]:
    """Every training segment of one run: the arm's own cumulative seconds after it, and the
    trained trial's values as recorded there (NaN for a failed one)."""
    plan = task.args
    problem = task.problem
    space = problem.space()
    budget = problem.budget()
    names = list(problem.objectives)
    proposer, options = PROPOSERS[task.proposer]
    options = {**options, **plan["options"].get(task.proposer, {})}
    history: list[dict] = []
    events: list[dict] = []
    spent = {"seconds": 0.0, "steady_seconds": 0.0, "segments": 0}

    # Complete learning curves (pilot and trials trained to the full budget): promote: predicted
    # and multi_fidelity, and the 'predicted' and 'mf' fits read their rung-to-final gains
    # (early_stopping.predict_final, multi_fidelity_final).
    reference: list[dict] = []

    def record(point: dict, metrics: Mapping[str, Any]) -> None:
        history.append(
            {
                **point,
                **{n: metrics.get(n) for n in names},
                "status": metrics.get("status") or "ok",
                "steps": int(metrics["steps"]),
            }
        )
        if int(metrics["steps"]) >= budget and (metrics.get("status") or "ok") == "ok":
            reference.append({**point, "curve": metrics.get("curve") or []})

    for point in pilot_design(space, plan["pilot"], "lhs", task.seed):
        metrics = problem.answer(space, point, budget, task.seed)
        record(point, metrics)
        events.append(_event(task, 0, space.trial_id(point), metrics, names, spent, own=False))

    if task.variant == "full":
        arm = Arm(task.proposer, proposer, plan["rounds"], plan["batch"], options)
        for round_ in range(1, plan["rounds"] + 1):
            for point in next_proposals(space, problem.objectives, arm, pd.DataFrame(history), task.seed, round_):
                metrics = problem.answer(space, point, budget, task.seed)
                record(point, metrics)
                events.append(_event(task, round_, space.trial_id(point), metrics, names, spent))
        return events

    index, _, fit = task.variant.removeprefix("es").partition("-")
    spec = schedule_spec(plan["schedules"][int(index)])
    lead = int(spec.pop("lead", 0))
    # promote 'oracle' (a diagnostic, this bench only): every rung ranked, by crowding, at the
    # trials' true full-budget values, as no rule could know them: how far any promotion could go.
    oracle = spec.get("promote") == "oracle"
    schedule = EarlyStopping.from_config({**spec, "promote": "crowding"} if oracle else spec)
    # 'same': the arm keeps the name of the arm without early stopping, as an arm of a study does when
    # early_stopping is added to it, so both draw the same proposer seeds (round_seed) and their
    # first rounds propose the same points from the same pilot: a paired comparison. 'own': a name
    # of its own (the releases before 2026-12-04), its own seeds.
    name = task.proposer if plan.get("es_name", "same") == "same" else f"{task.proposer}-es"
    arm = Arm(name, proposer, plan["max_rounds"], plan["es_batch"] or plan["batch"], options, schedule)
    round_ = 0
    cap = plan["seconds_cap"][task.seed]
    while any(spent[c] < cap[c] for c in cap) and round_ < plan["max_rounds"]:
        round_ += 1
        fitted = pd.DataFrame(history)
        if fit == "predicted":
            fitted = _predicted_history(fitted, problem.objectives, reference, budget)
        elif fit == "mf":
            fitted = _multi_fidelity_history(fitted, problem.objectives, reference, budget, space)
        points = next_proposals(
            space,
            problem.objectives,
            arm,
            fitted,
            task.seed,
            round_,
            stopped="highest_rung" if fit in ("predicted", "mf") else fit or None,
        )
        by_id = {space.trial_id(p): p for p in points}
        trained: dict[str, dict] = {}

        def train(trial_id: str, step: int) -> dict:
            metrics = problem.answer(space, by_id[trial_id], step, task.seed)
            events.append(_event(task, round_, trial_id, metrics, names, spent, before=trained.get(trial_id)))
            trained[trial_id] = metrics
            return metrics

        # lead: the round's first proposals (the proposer's best guesses) skip the rungs and train
        # to the full budget first, as Hyperband's bracket without early stopping.
        ids = list(by_id)
        for trial_id in ids[:lead]:
            record(by_id[trial_id], train(trial_id, budget))
        if oracle:
            truth = {i: problem.answer(space, by_id[i], budget, task.seed) for i in ids[lead:]}
            outcome = _oracle_halving(ids[lead:], schedule, budget, problem.objectives, train, truth)
        else:
            outcome = successive_halving(
                ids[lead:], schedule, budget, problem.objectives, train, by_id, list(reference)
            )
        for trial_id, metrics in outcome.items():
            record(by_id[trial_id], metrics)
        if _volume(problem, events) >= plan["target_hv"][task.seed] - 1e-12:
            # It reached 'full''s final hypervolume: its fraction is known, and from here its
            # curve (held at this value; it could only rise) is at or above 'full''s, which never
            # exceeds its final value. Training on would change no result.
            break
    return events


def _oracle_halving(ids, schedule, budget, objectives, train, truth) -> dict[str, dict]:
    """``successive_halving`` with every rung's promotion made on ``truth`` (each trial's metrics
    at the full budget) instead of its rung values; the trials' records stay their rung values."""
    alive, outcome = list(ids), {}
    steps = schedule.rung_steps(budget)
    for rung, step in enumerate(steps):
        outcome.update({i: dict(train(i, step)) for i in alive})
        if rung == len(steps) - 1:
            break
        decided = promotion(
            rung_results({i: truth[i] for i in alive}, objectives, rung, step), objectives, schedule.n_keep(len(alive))
        )
        alive = decided.loc[decided["promoted"], "trial_id"].tolist()
        for i in decided.loc[~decided["promoted"], "trial_id"]:
            if (outcome[i].get("status") or "ok") == "ok":
                outcome[i]["status"] = STOPPED
    return {i: outcome[i] for i in ids}


def _predicted_history(history: pd.DataFrame, objectives, reference: list[dict], budget: int) -> pd.DataFrame:
    """The 'predicted' fit: each stopped trial's curve objectives at their predicted full-budget
    values (``predict_final`` from the complete curves so far), so the proposer fits them as
    full-budget results instead of at their worse rung values."""
    history = history.copy()
    stopped = history["status"] == "stopped"
    for step, rows in history[stopped].groupby("steps"):
        for name, sense in objectives.items():
            if any(name in row for run in reference for row in run["curve"]):
                predicted = predict_final(rows.to_dict("records"), rows[name], int(step), reference, name, sense)
                history.loc[rows.index, name] = predicted
    return history


def _multi_fidelity_history(
    history: pd.DataFrame, objectives, reference: list[dict], budget: int, space: SearchSpace
) -> pd.DataFrame:
    """The 'mf' fit: each stopped trial's curve objectives at their full-budget values as
    ``multi_fidelity_final`` predicts them from the complete curves so far, so the proposer fits
    them as full-budget results (a rung-aware fit: the rung's gain modelled across the space)."""
    history = history.copy()
    stopped = (history["status"] == "stopped").to_numpy()
    if not stopped.any():
        return history
    rows = history[stopped]
    for name, sense in objectives.items():
        if any(name in row for run in reference for row in run["curve"]):
            history.loc[stopped, name] = multi_fidelity_final(
                rows.to_dict("records"), rows[name], rows["steps"], reference, name, budget, space.tunable_names, sense
            )
    return history


_SCALES: dict[str, Scale] = {}


def _volume(problem: Problem, events: list[dict]) -> float:
    """The hypervolume ``add_hypervolume`` gives the run's last event."""
    if problem.name not in _SCALES:
        _SCALES[problem.name] = problem.scale()
    run = add_hypervolume(pd.DataFrame(events), {problem.name: problem}, {problem.name: _SCALES[problem.name]})
    return float(run["hv"].iloc[-1])


def _event(task, round_, trial_id, metrics, names, spent, before: dict | None = None, own: bool = True) -> dict:
    """One training segment; a resumed trial adds only the seconds past its last rung
    (``before``: its metrics there), in both accountings. Its values are the trial's as
    recorded at the segment's end (a failed trial has none)."""
    if own:
        for cost in ("seconds", "steady_seconds"):
            column = "train_seconds" if cost == "seconds" else cost
            spent[cost] += float(metrics[column]) - (float(before[column]) if before else 0.0)
        spent["segments"] += 1
    result = (metrics.get("status") or "ok") in RESULT_STATUSES
    return {
        "problem": task.problem.name,
        "proposer": task.proposer,
        "variant": task.variant,
        "seed": task.seed,
        "round": round_,
        "trial_id": trial_id,
        "steps": int(metrics["steps"]),
        "seconds": spent["seconds"],
        "steady_seconds": spent["steady_seconds"],
        "segments": spent["segments"],
        **{f"value_{n}": (metrics[n] if result else np.nan) for n in names},
    }


def add_hypervolume(events: pd.DataFrame, problems: dict[str, Problem], scales=None) -> pd.DataFrame:
    """Each event's hypervolume: of every trial of the run so far at its latest recorded values
    (a trial promoted to a later rung replaces its earlier values), over the true front's."""
    parts = []
    for name, per_problem in events.groupby("problem", sort=False):
        problem = problems[name]
        scale = problem.scale() if scales is None else scales[name]
        names = list(problem.objectives)
        senses = list(problem.objectives.values())
        for _, run in per_problem.groupby(["proposer", "variant", "seed"], sort=False):
            run = run.copy()
            Y = to_minimization(run[[f"value_{n}" for n in names]].to_numpy(dtype=float), senses)
            latest: dict[str, np.ndarray] = {}
            volumes = []
            for trial_id, y in zip(run["trial_id"], Y):
                latest[trial_id] = y
                normalized = normalize(np.array(list(latest.values())), scale.lower, scale.upper)
                volumes.append(hypervolume(normalized, np.full(len(names), REFERENCE)) / scale.front_volume)
            run["hv"] = volumes
            run["process_seconds"] = run["steady_seconds"] + problem.start_cost() * run["segments"]
            parts.append(run)
    return pd.concat(parts, ignore_index=True)


def hv_at(run: pd.DataFrame, seconds: np.ndarray, cost: str = "seconds") -> np.ndarray:
    """The run's hypervolume once it has spent each of ``seconds`` of ``cost`` (a step function)."""
    own = run[run["round"] > 0]
    base = run.loc[run["round"] == 0, "hv"].max()
    index = np.searchsorted(own[cost].to_numpy(), seconds, side="right") - 1
    values = own["hv"].to_numpy()
    return np.where(index >= 0, values[np.clip(index, 0, None)], base)


def goal(
    curves: pd.DataFrame, variant: str = "es", grid_points: int = 200, accounting: str = "recorded"
) -> pd.DataFrame:
    """Per problem and proposer: the median fraction of the no-early-stopping arm's seconds the
    ``variant`` arm needs to reach that arm's final hypervolume, and the worst gap of its
    median curve at equal seconds, with the seconds counted as ``accounting`` says
    (``ACCOUNTINGS``)."""
    cost = ACCOUNTINGS[accounting]
    rows = []
    for (problem, proposer), per in curves.groupby(["problem", "proposer"], sort=False):
        full, es = per[per["variant"] == "full"], per[per["variant"] == variant]
        if es.empty:
            continue
        fractions, grids = [], []
        total = float(np.median(full.groupby("seed")[cost].max()))
        grid = np.linspace(0, total, grid_points + 1)[1:]
        trivial = 0
        for seed, run in full.groupby("seed"):
            target, seconds = run["hv"].iloc[-1], run[cost].iloc[-1]
            mine = es[es["seed"] == seed]
            grids.append((hv_at(mine, grid, cost), hv_at(run, grid, cost)))
            if run.loc[run["round"] == 0, "hv"].max() >= target - 1e-12:
                trivial += 1  # the arm without added nothing to its pilot: any arm "reaches" it at 0 s
                continue
            own = mine[(mine["round"] > 0) & (mine["hv"] >= target - 1e-12)]
            fractions.append((own[cost].min() if len(own) else np.inf) / seconds)
        fractions = fractions or [np.nan]
        # How far the median fraction could move with other seeds: the 2.5 and 97.5 percentiles of
        # the median over 2000 resamples of the seeds (with replacement; a fixed generator).
        draws = np.random.default_rng(0).choice(np.asarray(fractions, dtype=float), (2000, len(fractions)))
        with np.errstate(invalid="ignore"):  # a median of inf and a finite value
            low, high = np.percentile(np.median(draws, axis=1), [2.5, 97.5], method="nearest")
        es_median = np.median([g[0] for g in grids], axis=0)
        full_median = np.median([g[1] for g in grids], axis=0)
        gap = es_median - full_median
        below = grid[gap < -1e-12]
        rows.append(
            {
                "problem": problem,
                "proposer": proposer,
                "variant": variant,
                "accounting": accounting,
                "seeds": len(grids),
                "trivial": trivial,
                "fraction_median": float(np.median(fractions)),
                # "nearest": a seed that never reaches the target counts as infinity, not NaN.
                "fraction_q1": float(np.percentile(fractions, 25, method="nearest")),
                "fraction_q3": float(np.percentile(fractions, 75, method="nearest")),
                "median_low": float(low),
                "median_high": float(high),
                # The other reading of the goal, on the median curves: the early-stopping arm's
                # median hypervolume at a third of the axis, against 'full''s median final one.
                "hv_es_third": float(es_median[max(0, int(np.ceil(len(grid) / 3)) - 1)]),
                "reached": int(np.isfinite(fractions).sum()),
                "counted": len(grids) - trivial,
                "final_hv_full": float(np.median(full.groupby("seed")["hv"].last())),
                "final_hv_es": float(np.median(es.groupby("seed")["hv"].last())),
                "worst_gap": float(gap.min()),
                "below_share": float(len(below) / len(grid)),
                "below_until": float(below.max() / total) if len(below) else 0.0,
            }
        )
    return pd.DataFrame(rows)


def schedule_spec(entry) -> dict:
    """A --schedules entry, [rungs, keep], [rungs, keep, promote] or [rungs, keep, promote, lead], as
    the arm's early_stopping (and this bench's lead)."""
    return dict(zip(("rungs", "keep", "promote", "lead"), entry))


def schedule_label(plan_schedules, variant: str) -> str:
    """'es0' -> 'es0 [0.167, 0.5, 1.0] keep 0.334' (and the promotion and fit, if not the default)."""
    if variant == "full":
        return variant
    index, _, fit = variant.removeprefix("es").partition("-")
    spec = schedule_spec(plan_schedules[int(index)])
    promote = f" promote {spec['promote']}" if spec.get("promote", "crowding") != "crowding" else ""
    lead = f" lead {spec['lead']}" if spec.get("lead") else ""
    return f"es{index} {list(spec['rungs'])} keep {spec['keep']}{promote}{lead}" + (f", fit {fit}" if fit else "")


def markdown(table: pd.DataFrame, args: argparse.Namespace, command: str, elapsed: float, commit: str, starts) -> str:
    out = [
        "# Early stopping: training seconds to the same hypervolume",
        "",
        f"Command: `{command}` at commit {commit} ({elapsed / 60:.1f} min wall clock, {os.cpu_count()} cores).",
        "",
        f"Protocol: {args.seeds} seeds; per seed a Latin-hypercube pilot of {args.pilot} trials (full budget, "
        f"shared, its cost left out); a table is searched over its own measured levels. One arm, {args.batch} "
        f"trials a round (proposer options {json.dumps(args.options)}). Without early stopping ('full', the arm "
        f"at its full budget): {args.rounds} rounds, each trial trained to the full budget. With it ('es<i>', "
        f"schedule i: rungs as fractions of the budget, keep): the same arm, {args.es_batch or args.batch} trials a "
        + (
            "round (the arm's own name: the same proposer seeds, so its first round proposes the same points) "
            if args.es_name == "same"
            else "round (under a name of its own: its own proposer seeds) "
        )
        + "through the rungs, round "
        "after round until it has spent as many training seconds as 'full' in every accounting (the round that "
        "crosses it completes).",
        "",
        "HV: hypervolume of every trial at its recorded values (a stopped trial at its highest rung, select "
        "best), divided by the true front's (a table's: the front of its measured runs at the full budget, each "
        "at its best checkpoint). Normalization per objective (minimization form): 0 at the true front's best "
        "value, 1 at the larger of the front's worst value and the median over all the problem's full-budget "
        "runs; reference point 1.1 in these units; a point beyond it adds nothing.",
        "",
        "Accounting of the training seconds: 'recorded': as the table recorded them (`train_time`: the first "
        "trial of each of the 12 measuring processes carries their one-off start cost, kernel compilation and "
        "warm-up, "
        + ", ".join(f"median {v:.1f} s on {k}" for k, v in starts.items())
        + "); 'steady': every run's start cost taken out (what a study pays when its trials share one "
        "worker process, the start cost then paid once per study by both arms alike); 'per_process': steady "
        "plus that median start cost for every training segment (a process per trial and per rung, as the "
        "workflow's train_trial and train_rung jobs run today). The goal is judged on 'steady'.",
        "",
        "'fraction': seconds 'es' needs to reach 'full''s final HV / seconds 'full' spent, median [quartiles] "
        "over the seeds where 'full' improved on its pilot ('counted'; in the others the target is the pilot's "
        "own HV, reached at 0 s) (goal: <= 0.333; 'inf': not reached within the budget). 'below': share of the "
        "cost axis (0..full's median seconds, 200 points) where the median 'es' curve is below the median "
        "'full' curve, and up to which fraction of the axis; 'worst gap' the largest deficit in HV.",
        "",
        "'median 95%': where the median fraction lies in 95% of bootstrap resamples of the seeds. 'HV es @1/3': "
        "the median 'es' curve at a third of the axis, the goal read on the median curves (against 'HV full', "
        "the median final HV of 'full').",
        "",
        "| problem | proposer | variant | accounting | fraction | median 95% | reached / counted | HV full | HV es | HV es @1/3 | below (until) | worst gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        out.append(
            f"| {row['problem']} | {row['proposer']}{' (default)' if row['proposer'] == DEFAULT_PROPOSER else ''} | "
            f"{schedule_label(args.schedules, row['variant'])} | {row['accounting']} | {row['fraction_median']:.3f} "
            f"[{row['fraction_q1']:.3f}-{row['fraction_q3']:.3f}] | "
            f"{row['median_low']:.3f}-{row['median_high']:.3f} | "
            f"{row['reached']}/{row['counted']} | {row['final_hv_full']:.4f} | {row['final_hv_es']:.4f} | "
            f"{row['hv_es_third']:.4f} | "
            f"{row['below_share']:.0%} ({row['below_until']:.2f}) | {row['worst_gap']:+.4f} |"
        )
    out += ["", "## The goal, for the default proposer", ""]
    for _, row in table[table["proposer"] == DEFAULT_PROPOSER].iterrows():
        meets = row["fraction_median"] <= 1 / 3 + 1e-9
        never = row["below_share"] == 0
        out.append(
            f"- {row['problem']}, {schedule_label(args.schedules, row['variant'])}, {row['accounting']} seconds: "
            f"{row['fraction_median']:.3f} of the seconds ({'meets' if meets else 'misses'} <= 1/3); at equal seconds "
            + (
                "never below"
                if never
                else f"BELOW on {row['below_share']:.0%} of the axis, up to {row['below_until']:.2f}"
            )
            + (" -> GOAL MET" if meets and never else "")
        )
    return "\n".join(out)


def make_table(path: Path, max_steps: int, evaluations: int) -> None:
    """A learning-curve table from lora_surrogate's synthetic curves (select last: the raw curve),
    on a rank x alpha x lr grid; runs whose effective step lr * alpha / rank exceeds 0.016 diverge
    at a third of the budget (the row where the loss went non-finite)."""
    space = SearchSpace.from_config(SPACE)
    every = max_steps // evaluations
    rows = []
    for rank in (4, 8, 16, 32, 64, 128, 256):
        for alpha in (4, 16, 64, 256):
            for lr in np.geomspace(1e-5, 1e-2, 7):
                point = space.snap({"lora_rank": rank, "lora_alpha": alpha, "learning_rate": float(lr)})
                diverges = point["learning_rate"] * alpha / rank > 0.016
                for step in range(every, max_steps + 1, every):
                    metrics = evaluate(
                        "lora_surrogate",
                        space,
                        point,
                        {"eval_loss": "min"},
                        step=step,
                        max_steps=max_steps,
                        select="last",
                    )
                    row = {**point, "step": step, "max_steps": max_steps, "status": "ok"}
                    row.update(
                        {k: metrics[k] for k in ("eval_loss", "train_loss", "trainable_params", "peak_memory_gib")}
                    )
                    row["train_time"] = metrics["train_seconds"]
                    if diverges and step >= max_steps // 3:
                        rows.append({**row, "eval_loss": None, "train_loss": None, "status": "diverged"})
                        break
                    rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(
        f"wrote {len(rows)} rows ({len(rows) and len({(r['lora_rank'], r['lora_alpha'], r['learning_rate']) for r in rows})} runs) to {path}"
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--pilot", type=int, default=6, help="pilot trials per seed (default 6, the workflow's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the arm without early stopping (default 3)")
    parser.add_argument("--batch", type=int, default=9, help="trials per round, both variants (default 9)")
    parser.add_argument(
        "--es-batch", type=int, default=0, help="trials per round of the early-stopping arms (default --batch)"
    )
    parser.add_argument(
        "--schedules",
        type=json.loads,
        default=[[[0.111, 0.333, 1.0], 0.334]],
        help="JSON list of [rungs, keep], [rungs, keep, promote] or [rungs, keep, promote, lead] (default the "
        "issue's [[[0.111, 0.333, 1.0], 0.334]]); promote may also be 'oracle' (this bench only: rungs ranked at "
        "the trials' true full-budget values, a bound); lead: how many of a round's first proposals skip the "
        "rungs and train to the full budget first (this bench only; default 0)",
    )
    parser.add_argument(
        "--model-schedules",
        type=int,
        default=1000,
        help="model-based proposers run only the first N schedules (random runs them all; default all)",
    )
    parser.add_argument(
        "--options",
        type=json.loads,
        default={},
        help='JSON proposer options by proposer, e.g. {"optuna-gp": {"qmc_samples": 32}}',
    )
    parser.add_argument("--max-steps", type=int, default=90, help="the synthetic problems' step budget")
    parser.add_argument("--problems", default="zdt1,dtlz2,lora_surrogate", help="synthetic-curve problems")
    parser.add_argument("--tables", default="", help="comma-separated learning-curve tables (JSONL/TSV)")
    parser.add_argument("--proposers", default="random,optuna-gp,optuna-tpe", help="of " + ",".join(PROPOSERS))
    parser.add_argument(
        "--fits",
        default="full_budget",
        help="fits of stopped trials other than proposers.base.STOPPED_FIT to measure for model-based proposers, "
        "with the first schedule; 'predicted' (this bench only): stopped trials at their predict_final values; "
        "'mf' (this bench only): at a multi-fidelity GP's predicted full-budget values",
    )
    parser.add_argument(
        "--es-name",
        choices=("same", "own"),
        default="same",
        help="the early-stopping arm's name: 'same' as the arm without (the same proposer seeds, a paired "
        "comparison; default), or 'own' (its own seeds, as records before 2026-12-04)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix (default: by commit)")
    parser.add_argument("--make-table", type=Path, default=None, help="write a synthetic table there and exit")
    parser.add_argument(
        "--render-only", action="store_true", help="re-write the .md from the .tsv of an earlier run at --out (no runs)"
    )
    parser.add_argument(
        "--elapsed-min", type=float, default=float("nan"), help="with --render-only: the runs' wall time"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.make_table:
        make_table(args.make_table, args.max_steps, 9)
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    out = args.out or RESULTS / f"early_stopping_{commit}"
    two = {"zdt1": TWO, "zdt2": TWO, "dtlz2": TWO, "lora_surrogate": TABLE_OBJECTIVES}
    problems = {name: Problem(name, name, two[name], args.max_steps) for name in filter(None, args.problems.split(","))}
    for path in filter(None, args.tables.split(",")):
        problems[Path(path).stem] = Problem(Path(path).stem, path, TABLE_OBJECTIVES, args.max_steps)
    proposers = args.proposers.split(",")
    # Other fits of stopped trials are measured with the first schedule, for model-based proposers.
    variants = [f"es{i}" for i in range(len(args.schedules))]
    fits = [f"es0-{f}" for f in filter(None, args.fits.split(","))]
    plan = {
        "pilot": args.pilot,
        "rounds": args.rounds,
        "batch": args.batch,
        "es_batch": args.es_batch,
        "es_name": args.es_name,
        "schedules": args.schedules,
        "options": args.options,
        "max_rounds": 50,
    }
    command = shlex.join([".venv/bin/python", "bench/early_stopping.py", *(sys.argv[1:] if argv is None else argv)])
    if args.render_only:
        command = command.replace(" --render-only", "").split(" --elapsed-min")[0]
        ran = re.search(r"early_stopping_([0-9a-f]{7,})", out.name)
        commit = f"{ran.group(1)} (report re-rendered at {commit})" if ran else commit
        for name in problems:
            curves = pd.read_csv(problem_path(out, name).with_suffix(".tsv"), sep="\t")
            report(
                curves,
                [*variants, *fits],
                args,
                command,
                60 * args.elapsed_min,
                commit,
                problem_path(out, name),
                problems[name],
            )
        return
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    chatter = out.with_name(out.name + "_workers.log")
    chatter.parent.mkdir(parents=True, exist_ok=True)
    chatter.write_text("")
    events: list[dict] = []
    with context.Pool(args.workers, initializer=_quiet_worker, initargs=(str(chatter),)) as pool:
        # The arms without early stopping first: their seconds cap the early-stopping arms.
        full = [Task(p, q, "full", s, plan) for p in problems.values() for q in proposers for s in range(args.seeds)]
        for done, result in enumerate(pool.imap_unordered(run_task, full), start=1):
            events += result
        print(f"{len(full)} runs without early stopping: {time.perf_counter() - started:.0f} s", flush=True)
        spent = pd.DataFrame(events).groupby(["problem", "proposer", "seed"])[["seconds", "steady_seconds"]].max()
        final = add_hypervolume(pd.DataFrame(events), problems).groupby(["problem", "proposer", "seed"])["hv"].last()
        staged = []
        for q in sorted(proposers, key=lambda q: q == "random"):  # the slow model-based runs first
            for p in problems.values():
                cap = {s: spent.loc[(p.name, q, s)].astype(float).to_dict() for s in range(args.seeds)}
                mine = variants + fits if q != "random" else variants
                mine = mine if q == "random" else [v for v in mine if int(v[2:].split("-")[0]) < args.model_schedules]
                target = {s: float(final[(p.name, q, s)]) for s in range(args.seeds)}
                staged += [
                    Task(p, q, v, s, {**plan, "seconds_cap": cap, "target_hv": target})
                    for v in mine
                    for s in range(args.seeds)
                ]
        for done, result in enumerate(pool.imap_unordered(run_task, staged), start=1):
            events += result
            if done % 20 == 0:
                print(f"[{done}/{len(staged)}] early-stopping runs, {time.perf_counter() - started:.0f} s", flush=True)
    elapsed = time.perf_counter() - started
    curves = add_hypervolume(pd.DataFrame(events), problems)
    for name, per_problem in curves.groupby("problem", sort=False):
        per_problem.to_csv(problem_path(out, name).with_suffix(".tsv"), sep="\t", index=False)
        report(per_problem, [*variants, *fits], args, command, elapsed, commit, problem_path(out, name), problems[name])


def problem_path(out: Path, problem: str) -> Path:
    """bench/results/early_stopping_<commit>_<problem> (its .md and .tsv)."""
    return out.with_name(f"{out.name}_{problem}")


def report(curves, variants: list[str], args, command: str, elapsed: float, commit: str, out: Path, problem: Problem):
    table = pd.concat([goal(curves, v, accounting=a) for v in variants for a in ACCOUNTINGS], ignore_index=True)
    table = table.sort_values(["problem", "proposer", "variant"], kind="stable")
    starts = {problem.name: problem.start_cost()} if problem.start_cost() else {}
    text = markdown(table, args, command, elapsed, commit, starts)
    out.with_suffix(".md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()

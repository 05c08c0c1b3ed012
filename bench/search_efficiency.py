"""Search efficiency: how fast each proposer's hypervolume grows, on problems with known fronts.

Every proposer starts from the same Latin-hypercube pilot of a seed, then proposes batches
until the budget. After each trial, the hypervolume of the (noise-free) objective values
found so far is divided by that of the true Pareto front. Both are taken in one
normalization per problem: the true front's ideal point maps to 0 and its nadir to 1, and
the reference point is 1.1 in every objective (``loratune.pareto``'s convention, with the
bounds taken from the truth rather than from the trials, so that every arm and seed is
measured on the same scale and only points near the front count).

Run from the repository root (the recorded run, about 25 minutes on 2 cores):

    .venv/bin/python bench/search_efficiency.py

A quick look: ``--seeds 2 --budget 12 --problems zdt1 --arms random,botorch``. It writes
``bench/results/search_efficiency.{md,html,tsv}`` and ``search_efficiency_timing.tsv``.
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread per worker process: the workers are the parallelism, and the
# machine is shared. Set before numpy and torch load (spawned workers re-import this file).
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import re  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Mapping  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Runs as a plain script; spawned workers import this file by path, so they need it too.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loratune.benchmarks import (  # noqa: E402
    LoraTable,
    TabulatedTrialFailed,
    evaluate,
    get_problem,
    true_front,
)
from loratune.designs import pilot_design  # noqa: E402
from loratune.loop import round_seed  # noqa: E402
from loratune.pareto import (  # noqa: E402
    REFERENCE,
    best_subset_hypervolumes,
    hypervolume,
    normalize,
    to_minimization,
)
from loratune.plots import rgba  # noqa: E402
from loratune.proposers import make_proposer  # noqa: E402
from loratune.space import SearchSpace  # noqa: E402

RESULTS = REPO / "bench" / "results"

# The study's search space (config/experiments): rank on a step of 4, alpha from powers of
# two, the learning rate on a log scale.
SPACE = {
    "lora_rank": {"type": "int", "low": 4, "high": 256, "step": 4},
    "lora_alpha": {"type": "choice", "values": [4, 8, 16, 32, 64, 128, 256]},
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
}
# The workflow's default arm (config/config.yaml, the schema's default arms): the goal is stated for it.
DEFAULT_ARM = "optuna-gp"
CHECKPOINTS = (8, 16, 32)


@dataclass(frozen=True)
class BenchProblem:
    """A problem of ``loratune.benchmarks`` with the objectives and noise it is run with."""

    name: str
    problem: str
    objectives: Mapping[str, str]
    noise: float = 0.0
    about: str = ""
    # The search space, when not the study's (SPACE).
    space_config: Mapping[str, Any] | None = None

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_config(self.space_config or SPACE)

    def skip_reason(self) -> str | None:
        spec = get_problem(self.problem)
        if isinstance(spec, LoraTable) and not spec.available():
            return f"no measured grid at {spec.path} (measure it on a GPU first)"
        return None

    def front(self, space: SearchSpace) -> np.ndarray:
        """Points of the true Pareto front, in minimization space."""
        spec = get_problem(self.problem)
        if isinstance(spec, LoraTable):
            return spec.true_front(space, self.objectives)
        m = len(self.objectives)
        return true_front(self.problem, m, 2001 if m == 2 else 5000)

    def observe(self, space: SearchSpace, point: dict, seed: int) -> tuple[dict | None, np.ndarray | None]:
        """(what the proposer sees, the noise-free values in minimization space); both None
        for a failed trial."""
        try:
            observed = evaluate(self.problem, space, point, self.objectives, seed=seed, noise=self.noise)
        except TabulatedTrialFailed:
            return None, None
        truth = observed if self.noise == 0 else evaluate(self.problem, space, point, self.objectives)
        values = [truth[name] for name in self.objectives]
        return {name: observed[name] for name in self.objectives}, to_minimization(
            [values], list(self.objectives.values())
        )[0]


TWO = {"f1": "min", "f2": "min"}
BENCH_PROBLEMS = {
    p.name: p
    for p in (
        BenchProblem("zdt1", "zdt1", TWO, about="ZDT1, convex front; f1 = rank, distance in alpha and lr"),
        BenchProblem("zdt2", "zdt2", TWO, about="ZDT2, concave front"),
        BenchProblem(
            "dtlz2", "dtlz2", TWO, about="DTLZ2, 2 objectives: a quarter-circle front in the middle of alpha and lr"
        ),
        BenchProblem(
            "zdt1_noisy", "zdt1", TWO, noise=0.1, about="ZDT1 observed with N(0, 0.1^2) noise, scored noise-free"
        ),
        BenchProblem(
            "lora_table",
            "lora_table",
            {"eval_loss": "min", "train_time": "min"},
            about="measured SmolLM2-135M runs (bench/data/lora_grid.tsv, 4 x 4 x 4), answered by the nearest "
            "grid point: a proposal between grid levels repeats a measured run",
        ),
        BenchProblem(
            "lora_table_grid",
            "lora_table",
            {"eval_loss": "min", "train_time": "min"},
            about="the same measured runs, searched over the grid's own levels only (64 points), so that no "
            "trial repeats a measured run",
            space_config={
                "lora_rank": {"type": "choice", "values": [4, 16, 64, 256]},
                "lora_alpha": {"type": "choice", "values": [4, 16, 64, 256]},
                "learning_rate": {"type": "choice", "values": [1e-5, 1e-4, 1e-3, 1e-2]},
            },
        ),
    )
}


@dataclass(frozen=True)
class Arm:
    label: str
    proposer: str
    options: str = "{}"  # JSON, so that an arm pickles and prints as it was given

    @property
    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.options)


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


def run_task(task: Task) -> list[dict]:
    """Every trial of one (problem, arm, seed): parameters, observed and noise-free values."""
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
        proposer = make_proposer(
            task.arm.proposer,
            space,
            problem.objectives,
            seed=round_seed(task.seed, task.arm.label, round_),
            **task.arm.kwargs,
        )
        started = time.perf_counter()
        points = proposer.propose(pd.DataFrame(history), min(task.plan.batch, task.plan.budget - len(history)))
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
        lower, upper = front.min(axis=0), front.max(axis=0)
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


def add_hypervolume(trials: pd.DataFrame, scales: dict[str, Scale]) -> pd.DataFrame:
    parts = []
    for (problem, _arm, _seed), run in trials.groupby(["problem", "arm", "seed"], sort=False):
        run = run.sort_values("n_trials").copy()
        names = list(BENCH_PROBLEMS[problem].objectives)
        run["hv_ratio"] = scales[problem].ratios(run[[f"true_{n}" for n in names]].to_numpy(dtype=float))
        parts.append(run)
    return pd.concat(parts, ignore_index=True)


# ---- how close any proposer could get ---------------------------------------------------------

# The objective a table's oracle is told for every cell; the others it must find by trying.
ORACLE_METRIC = "eval_loss"
# The most front points the bounds place (the goal's 8 trials).
FRONT_POINTS_MAX = 8


def bounds(problems: list[str], plan: Plan, summary: pd.DataFrame) -> pd.DataFrame:
    """Per problem, what no proposer can beat. ``front_points``: the fewest trials exactly on
    the true front whose hypervolume reaches random search's final median (the best placement
    of k points, ``best_subset_hypervolumes``); after a pilot that adds nothing, no proposer
    can reach it before trial pilot + front_points. For a measured table, also the trials an
    oracle needs that knows every cell's eval loss (but not the other objective) and tries the
    cells from the lowest loss up: ``oracle_reach``, median over the seeds' pilots."""
    rows = []
    for name in problems:
        problem = BENCH_PROBLEMS[name]
        space = problem.space
        true_front = problem.front(space)
        scale = Scale.of(true_front)
        target = float(summary.loc[summary["problem"] == name, "target"].iloc[0])
        front = normalize(true_front, scale.lower, scale.upper)
        best = best_subset_hypervolumes(front, np.full(2, REFERENCE), FRONT_POINTS_MAX) / scale.front_volume
        reaching = np.flatnonzero(best >= target - 1e-12)
        row = {
            "problem": name,
            "target": target,
            "front_size": len(front),
            "front_points": int(reaching[0]) + 1 if len(reaching) else float("inf"),
            "oracle_reach": float("nan"),
            "oracle_seeds": [],
        }
        if isinstance(get_problem(problem.problem), LoraTable) and ORACLE_METRIC in problem.objectives:
            reach = [_loss_oracle_reach(problem, plan, seed, scale, target) for seed in range(plan.seeds)]
            row["oracle_reach"] = float(np.median(reach))
            row["oracle_seeds"] = reach
        rows.append(row)
    return pd.DataFrame(rows)


def _loss_oracle_reach(problem: BenchProblem, plan: Plan, seed: int, scale: Scale, target: float) -> float:
    """Trials to ``target`` for the seed's pilot followed by the table's cells in order of
    eval loss, skipping cells already measured (a pilot point is its nearest cell)."""
    table = get_problem(problem.problem)
    space = problem.space
    names = list(problem.objectives)
    pilot = pilot_design(space, plan.pilot, "lhs", seed)
    seen = {int(table.nearest(space, point).name) for point in pilot}
    values = [problem.observe(space, point, seed)[1] for point in pilot]
    rows, _ = table.rows_in(space)
    for index, row in rows.sort_values(ORACLE_METRIC, kind="stable").iterrows():
        if int(index) in seen:
            continue
        seen.add(int(index))
        values.append(problem.observe(space, space.snap(row[space.tunable_names].to_dict()), seed)[1])
    Y = np.array([v if v is not None else np.full(len(names), np.nan) for v in values], dtype=float)
    return trials_to_reach(pd.DataFrame({"n_trials": np.arange(1, len(Y) + 1), "hv_ratio": scale.ratios(Y)}), target)


def table_time_signal(problem: BenchProblem) -> str:
    """How much of a table's train_time the hyperparameters explain: a Kruskal-Wallis test per
    parameter (the same runs grouped by its levels)."""
    from scipy.stats import kruskal

    rows, _ = get_problem(problem.problem).rows_in(problem.space)
    rows = rows[np.isfinite(rows["train_time"])]
    parts = []
    for name in problem.space.tunable_names:
        groups = [group["train_time"].to_numpy() for _, group in rows.groupby(name)]
        parts.append(f"{name} p = {kruskal(*groups).pvalue:.2f}")
    return (
        f"train_time {rows['train_time'].min():.1f}-{rows['train_time'].max():.1f} s "
        f"(sd {rows['train_time'].std():.1f} s), unrelated to the hyperparameters (Kruskal-Wallis "
        + ", ".join(parts)
        + ")"
    )


# ---- the summary ---------------------------------------------------------------------------


def hv_at(curves: pd.DataFrame, n: int) -> pd.Series:
    """Per (problem, arm), the hypervolume ratios of all seeds after ``n`` trials."""
    at = curves[curves["n_trials"] == n]
    return at.groupby(["problem", "arm"])["hv_ratio"].apply(list)


def trials_to_reach(run: pd.DataFrame, target: float) -> float:
    """The first trial count whose hypervolume reaches ``target`` and is above zero (inf if
    none does): when random search's median is 0, reaching it means getting inside the
    reference box at all."""
    reached = run.loc[(run["hv_ratio"] >= target - 1e-12) & (run["hv_ratio"] > 0), "n_trials"]
    return float(reached.min()) if len(reached) else float("inf")


def summarize(curves: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """Per problem and arm: median and quartiles of the hypervolume ratio at the checkpoints,
    and the trials needed to reach random search's median final hypervolume."""
    checkpoints = [c for c in CHECKPOINTS if c <= plan.budget] or [plan.budget]
    rows = []
    for problem, per_problem in curves.groupby("problem", sort=False):
        final = per_problem[(per_problem["arm"] == "random") & (per_problem["n_trials"] == plan.budget)]
        target = float(final["hv_ratio"].median()) if len(final) else float("nan")
        for arm, per_arm in per_problem.groupby("arm", sort=False):
            row: dict[str, Any] = {"problem": problem, "arm": arm, "seeds": per_arm["seed"].nunique()}
            for n in checkpoints:
                values = per_arm.loc[per_arm["n_trials"] == n, "hv_ratio"].to_numpy()
                q1, median, q3 = np.percentile(values, [25, 50, 75]) if len(values) else (np.nan,) * 3
                row.update({f"hv{n}_median": median, f"hv{n}_q1": q1, f"hv{n}_q3": q3})
            counts = [trials_to_reach(run, target) for _, run in per_arm.groupby("seed")]
            row["target"] = target
            row["trials_to_target"] = float(np.median(counts)) if counts and np.isfinite(target) else np.nan
            row["seeds_reaching"] = int(np.sum(np.isfinite(counts)))
            row["propose_s"] = float(per_arm.loc[per_arm["round"] > 0, "propose_s"].mean())
            rows.append(row)
    return pd.DataFrame(rows)


def _count(value: float, budget: int) -> str:
    if not np.isfinite(value) or value > budget:
        return f">{budget}"
    return f"{value:g}"


def goal_lines(summary: pd.DataFrame, plan: Plan, arm: str) -> list[str]:
    """Whether ``arm`` reaches random search's final hypervolume within 8 trials on every
    problem, and is never below Optuna's best sampler at the checkpoints (by median)."""
    checkpoints = [c for c in CHECKPOINTS if c <= plan.budget]
    lines = []
    for problem, rows in summary.groupby("problem", sort=False):
        mine = rows[rows["arm"] == arm]
        optuna = rows[rows["arm"].str.startswith("optuna")]
        if mine.empty:
            continue
        mine = mine.iloc[0]
        reach = mine["trials_to_target"]
        parts = [
            f"reaches random's {plan.budget}-trial HV in {_count(reach, plan.budget)} trials "
            f"({'meets' if reach <= 8 else 'misses'} <= 8)"
        ]
        if not optuna.empty:
            gaps = []
            for n in checkpoints:
                best = optuna[f"hv{n}_median"].max()
                best_arm = optuna.loc[optuna[f"hv{n}_median"].idxmax(), "arm"]
                gaps.append(f"@{n}: {mine[f'hv{n}_median'] - best:+.3f} vs {best_arm}")
            below = any(mine[f"hv{n}_median"] < optuna[f"hv{n}_median"].max() - 1e-12 for n in checkpoints)
            parts.append(("BELOW" if below else "never below") + " Optuna's best (" + ", ".join(gaps) + ")")
        lines.append(f"- {problem}: " + "; ".join(parts))
    return lines


def markdown(
    summary: pd.DataFrame,
    timing: pd.DataFrame,
    plan: Plan,
    arms: list[str],
    skipped: dict[str, str],
    command: str,
    elapsed: float,
    limits: pd.DataFrame | None = None,
) -> str:
    checkpoints = [c for c in CHECKPOINTS if c <= plan.budget]
    out = [
        "# Search efficiency: hypervolume per trial",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min wall clock).",
        "",
        f"Protocol: {plan.seeds} seeds; per seed one Latin-hypercube pilot of {plan.pilot} points shared by "
        f"every proposer, then batches of {plan.batch} up to {plan.budget} trials. Search space (all but "
        "lora_table_grid): lora_rank int 4..256 step 4, lora_alpha choice 4..256 (powers of two), learning_rate "
        "float 1e-5..1e-2 log. "
        "HV = hypervolume of the noise-free values found so far / hypervolume of the true front, both "
        "normalized by the true front (ideal -> 0, nadir -> 1, reference point 1.1). Cells: median "
        "[25th-75th percentile] over seeds. 'to reach' = trials needed to reach random search's median "
        f"{plan.budget}-trial HV, median over seeds (pilot included; '>{plan.budget}': not within the budget); "
        "'seeds' = how many seeds reach it.",
        "",
    ]
    for name, reason in skipped.items():
        out += [f"Skipped {name}: {reason}.", ""]
    for problem, rows in summary.groupby("problem", sort=False):
        about = BENCH_PROBLEMS[problem].about
        out += [
            f"## {problem}",
            "",
            f"{about}. Random search's median {plan.budget}-trial HV: " f"{rows['target'].iloc[0]:.3f}.",
            "",
        ]
        header = ["proposer"] + [f"HV@{n}" for n in checkpoints] + ["to reach", "seeds", "s/proposal"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        order = {a: i for i, a in enumerate(arms)}
        for _, row in rows.sort_values("arm", key=lambda s: s.map(order)).iterrows():
            cells = [row["arm"]]
            for n in checkpoints:
                cells.append(f"{row[f'hv{n}_median']:.3f} [{row[f'hv{n}_q1']:.3f}-{row[f'hv{n}_q3']:.3f}]")
            cells += [
                _count(row["trials_to_target"], plan.budget),
                f"{row['seeds_reaching']}/{row['seeds']}",
                f"{row['propose_s']:.2f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "## Overall",
        "",
        "Mean over the problems of the median HV at each checkpoint, and on how many "
        "problems the proposer reaches random search's final HV within 8 trials.",
        "",
    ]
    header = ["proposer"] + [f"mean HV@{n}" for n in checkpoints] + ["reaches within 8"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        rows = summary[summary["arm"] == arm]
        if rows.empty:
            continue
        cells = [arm] + [f"{rows[f'hv{n}_median'].mean():.3f}" for n in checkpoints]
        cells.append(f"{int((rows['trials_to_target'] <= 8).sum())}/{len(rows)}")
        out.append("| " + " | ".join(cells) + " |")
    if limits is not None and not limits.empty:
        out += ["", *limits_lines(summary, limits, plan)]
    out += ["", "## The goal, for the default proposer and the others", ""]
    for arm in arms:
        if arm == "random" or arm not in set(summary["arm"]):
            continue
        out += [f"**{arm}**{' (default)' if arm == DEFAULT_ARM else ''}", ""] + goal_lines(summary, plan, arm) + [""]
    if not timing.empty:
        out += [
            "## Proposal time with a long history",
            "",
            f"One `propose(history, n={int(timing['n'].iloc[0])})` call after a warm-up call (imports excluded), "
            "single process, on this 2-core machine (shared with other work; load average "
            f"{timing['load_average'].iloc[0]:.1f} at the start). Goal: <= 10 s.",
            "",
            "| proposer | problem | history | seconds |",
            "|---|---|---|---|",
        ]
        for _, row in timing.iterrows():
            out.append(
                f"| {row['arm']} | {row['problem']} ({row['objectives']} obj.) | {row['history']} | {row['seconds']:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def limits_lines(summary: pd.DataFrame, limits: pd.DataFrame, plan: Plan) -> list[str]:
    """The section on what no proposer can beat, with the best measured arm beside it."""
    out = [
        "## How close any proposer could get",
        "",
        "'front points': the fewest trials *exactly on the true front* whose hypervolume reaches random "
        f"search's {plan.budget}-trial median (the best placement of k points, exact); after a "
        f"{plan.pilot}-point pilot that adds nothing, no proposer reaches it before trial {plan.pilot} + that. "
        "'loss oracle' (measured tables): the median trials of a proposer told every cell's eval loss in "
        "advance, trying the cells from the lowest loss up after the same pilots. 'best arm': the fewest "
        "trials any measured proposer needed (median over seeds).",
        "",
        "| problem | random's HV@{0} | front points | earliest trial | loss oracle | best arm |".format(plan.budget),
        "|---|---|---|---|---|---|",
    ]
    for _, row in limits.iterrows():
        mine = summary[summary["problem"] == row["problem"]]
        best = mine.loc[mine["trials_to_target"].idxmin()] if mine["trials_to_target"].notna().any() else None
        oracle = (
            f"{_count(row['oracle_reach'], plan.budget)} ({', '.join(_count(v, plan.budget) for v in row['oracle_seeds'])})"
            if np.isfinite(row["oracle_reach"])
            else "-"
        )
        best_text = f"{_count(best['trials_to_target'], plan.budget)} ({best['arm']})" if best is not None else "-"
        earliest = plan.pilot + row["front_points"] if np.isfinite(row["front_points"]) else float("inf")
        out.append(
            f"| {row['problem']} | {row['target']:.3f} | {_count(row['front_points'], FRONT_POINTS_MAX)} of {row['front_size']} | "
            f"{_count(earliest, plan.budget)} | {oracle} | {best_text} |"
        )
    tables = [name for name in limits["problem"] if isinstance(get_problem(BENCH_PROBLEMS[name].problem), LoraTable)]
    if tables:
        out += [
            "",
            f"In the measured table, {table_time_signal(BENCH_PROBLEMS[tables[0]])}: three to six trials "
            "shared the GPU. Run alone, one at a time, the same model still trains in the same time at every rank "
            "(rank 4, 64, 256, three runs each: 14.5-16.3, 14.2-15.6, 13.4-16.5 s; "
            "`bench/results/lora_time_alone_h200_2026-11-30_e92ce32.tsv`): a 135M-parameter model's step on an H200 "
            "is bound by kernel launches, not by the LoRA rank. "
            "Which cells are fast is luck a model cannot learn, so on the table problems even the loss oracle "
            "misses 8 trials, and a proposer can only be judged on eval loss.",
        ]
    return out


def figure(curves: pd.DataFrame, summary: pd.DataFrame, plan: Plan, arms: list[str]):
    """Median hypervolume ratio against trials per problem and arm, with the quartile band;
    the dotted line is random search's median final hypervolume."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    problems = list(pd.unique(curves["problem"]))
    fig = make_subplots(
        rows=len(problems), cols=1, subplot_titles=problems, vertical_spacing=0.3 / max(len(problems), 1)
    )
    colors = {arm: qualitative.D3[i % len(qualitative.D3)] for i, arm in enumerate(arms)}
    for row, problem in enumerate(problems, start=1):
        per_problem = curves[curves["problem"] == problem]
        for arm in arms:
            per_arm = per_problem[per_problem["arm"] == arm]
            if per_arm.empty:
                continue
            stats = per_arm.groupby("n_trials")["hv_ratio"].quantile([0.25, 0.5, 0.75]).unstack()
            x = stats.index.to_numpy()
            color = colors[arm]
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([x, x[::-1]]),
                    y=np.concatenate([stats[0.75].to_numpy(), stats[0.25].to_numpy()[::-1]]),
                    fill="toself",
                    fillcolor=rgba(color, 0.12),
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup=arm,
                ),
                row=row,
                col=1,
            )
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=stats[0.5].to_numpy(),
                    mode="lines",
                    name=arm,
                    legendgroup=arm,
                    line={"color": color},
                    showlegend=row == 1,
                    hovertemplate=f"{arm}<br>%{{x}} trials: median HV %{{y:.3f}}<extra></extra>",
                ),
                row=row,
                col=1,
            )
        target = summary.loc[summary["problem"] == problem, "target"].iloc[0]
        fig.add_hline(y=target, line={"dash": "dot", "color": "#555555"}, row=row, col=1)
        fig.update_yaxes(title_text="HV / true front's HV", row=row, col=1)
        fig.update_xaxes(title_text="trials", row=row, col=1)
    fig.update_layout(
        height=330 * len(problems),
        title=f"Hypervolume per trial: median and quartiles over "
        f"{plan.seeds} seeds (pilot {plan.pilot}, batches of {plan.batch})",
    )
    return fig


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


# ---- the command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    # 4, not the workflow's 6: by trial 8 the model-based proposers have had two rounds
    # rather than one (BoTorch's median HV@8 on ZDT1 0.46 vs 0.17, 5 seeds).
    parser.add_argument("--pilot", type=int, default=4, help="Latin-hypercube pilot points per seed (default 4)")
    parser.add_argument("--batch", type=int, default=2, help="proposals per round (default 2)")
    parser.add_argument("--budget", type=int, default=32, help="trials per run, pilot included (default 32)")
    parser.add_argument(
        "--problems", default=",".join(BENCH_PROBLEMS), help="comma-separated, of " + ",".join(BENCH_PROBLEMS)
    )
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of " + ",".join(ARMS))
    parser.add_argument(
        "--extra-arm",
        action="append",
        default=[],
        metavar='LABEL=PROPOSER:{"option": value}',
        help="another arm, e.g. 'botorch-warp=botorch:{\"input_warping\": true}' (repeatable)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timing-history", type=int, default=200, help="history size for the timing (0: skip)")
    parser.add_argument("--out", type=Path, default=RESULTS / "search_efficiency", help="output path without suffix")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="re-render the .md and .html from the .tsv files of an earlier run at --out (no runs)",
    )
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="measure only the proposal times (--timing-history), then re-render as --render-only does",
    )
    parser.add_argument("--elapsed-min", type=float, default=None, help="with --render-only: the runs' wall time")
    args = parser.parse_args(argv)
    for name in ("seeds", "pilot", "batch", "budget", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1")
    if args.budget <= args.pilot:
        parser.error(f"--budget ({args.budget}) must exceed --pilot ({args.pilot})")
    return args


def select_arms(args: argparse.Namespace) -> list[Arm]:
    arms = []
    for label in args.arms.split(","):
        if label not in ARMS:
            raise SystemExit(f"--arms: unknown {label!r}; choose from {list(ARMS)}")
        arms.append(ARMS[label])
    for spec in args.extra_arm:
        label, _, rest = spec.partition("=")
        proposer, _, options = rest.partition(":")
        try:
            json.loads(options or "{}")
        except json.JSONDecodeError as error:
            raise SystemExit(f"--extra-arm {spec!r}: options are not JSON ({error})") from None
        if not label or not proposer:
            raise SystemExit(f"--extra-arm {spec!r}: expected LABEL=PROPOSER:{{json options}}")
        arms.append(Arm(label, proposer, options or "{}"))
    if "random" not in [a.label for a in arms]:
        raise SystemExit("--arms: must include random (the baseline of the summary)")
    return arms


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = Plan(args.seeds, args.pilot, args.batch, args.budget)
    arms = select_arms(args)
    problems, skipped = [], {}
    for name in args.problems.split(","):
        if name not in BENCH_PROBLEMS:
            raise SystemExit(f"--problems: unknown {name!r}; choose from {list(BENCH_PROBLEMS)}")
        reason = BENCH_PROBLEMS[name].skip_reason()
        if reason:
            print(f"skipping {name}: {reason}", flush=True)
            skipped[name] = reason
        else:
            problems.append(name)
    command = " ".join([".venv/bin/python bench/search_efficiency.py", *(sys.argv[1:] if argv is None else argv)])
    if args.timing_only:
        timing = measure_timing(arms, args.timing_history or 200, plan.batch)
        timing.to_csv(args.out.with_name(args.out.name + "_timing.tsv"), sep="\t", index=False)
    if args.render_only or args.timing_only:
        command = re.sub(r" --render-only| --timing-only| --elapsed-min \S+", "", command)
        render(args, plan, [a.label for a in arms], skipped, command)
        return

    tasks = sorted(
        (Task(p, a, s, plan) for p in problems for a in arms for s in range(plan.seeds)),
        key=lambda t: -t.cost,
    )
    print(
        f"{len(tasks)} runs ({len(problems)} problems x {len(arms)} arms x {plan.seeds} seeds) "
        f"on {args.workers} worker(s)",
        flush=True,
    )
    started = time.perf_counter()
    rows: list[dict] = []
    context = multiprocessing.get_context("spawn")
    chatter = args.out.with_name(args.out.name + "_workers.log")
    chatter.parent.mkdir(parents=True, exist_ok=True)
    chatter.write_text("")
    print(f"the workers' own warnings and prints go to {chatter}", flush=True)
    with context.Pool(args.workers, initializer=_quiet_worker, initargs=(str(chatter),), maxtasksperchild=20) as pool:
        for done, (task, result) in enumerate(pool.imap_unordered(_run_tagged, tasks), start=1):
            rows += result
            spent = sum(r["propose_s"] for r in result)
            print(
                f"[{done}/{len(tasks)}] {task.problem} {task.arm.label} seed {task.seed}: "
                f"{spent:.1f} s proposing, {time.perf_counter() - started:.0f} s elapsed",
                flush=True,
            )
    elapsed = time.perf_counter() - started

    scales = {p: Scale.of(BENCH_PROBLEMS[p].front(BENCH_PROBLEMS[p].space)) for p in problems}
    curves = add_hypervolume(pd.DataFrame(rows), scales)
    curves.to_csv(args.out.with_suffix(".tsv"), sep="\t", index=False)
    summary = summarize(curves, plan)
    timing = measure_timing(arms, args.timing_history, plan.batch) if args.timing_history else pd.DataFrame()

    labels = [a.label for a in arms]
    if not timing.empty:
        timing.to_csv(args.out.with_name(args.out.name + "_timing.tsv"), sep="\t", index=False)
    limits = bounds(list(dict.fromkeys(summary["problem"])), plan, summary)  # the sections' order
    text = markdown(summary, timing, plan, labels, skipped, command, elapsed, limits)
    args.out.with_suffix(".md").write_text(text + "\n")
    from loratune.plots import write_html

    write_html(figure(curves, summary, plan, labels), args.out.with_suffix(".html"))
    print(text, flush=True)


def render(args: argparse.Namespace, plan: Plan, labels: list[str], skipped: dict[str, str], command: str) -> None:
    """Write the report again from the curves and timing of an earlier run (e.g. after the default arm changed)."""
    curves = pd.read_csv(args.out.with_suffix(".tsv"), sep="\t")
    timing_path = args.out.with_name(args.out.name + "_timing.tsv")
    timing = pd.read_csv(timing_path, sep="\t") if timing_path.exists() else pd.DataFrame()
    labels = [label for label in labels if label in set(curves["arm"])]
    elapsed = 60 * args.elapsed_min if args.elapsed_min is not None else float("nan")
    summary = summarize(curves, plan)
    limits = bounds(list(dict.fromkeys(summary["problem"])), plan, summary)
    text = markdown(summary, timing, plan, labels, skipped, command, elapsed, limits)
    args.out.with_suffix(".md").write_text(text + "\n")
    from loratune.plots import write_html

    write_html(figure(curves, summarize(curves, plan), plan, labels), args.out.with_suffix(".html"))
    print(text, flush=True)


def _run_tagged(task: Task) -> tuple[Task, list[dict]]:
    return task, run_task(task)


def _quiet_worker(log_path: str) -> None:
    """Keep the progress lines readable: GPy and GPTune print and warn on every fit (an
    error still reaches the main process with the failed task)."""
    logging.disable(logging.WARNING)
    sys.stdout = sys.stderr = open(log_path, "a", buffering=1)


if __name__ == "__main__":
    main()

"""The search-efficiency report: summaries, what no proposer can beat, the goal lines, the
Markdown text and the figure, from the curves a run recorded."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from loratune.benchmarks import LoraTable, get_problem
from loratune.designs import pilot_design
from loratune.pareto import REFERENCE, best_subset_hypervolumes, normalize
from loratune.plots import rgba

from bench.efficiency.problems import BENCH_PROBLEMS, BenchProblem
from bench.efficiency.runner import Plan, Scale, scale_of

# The workflow's default arm (config/config.yaml, the schema's default arms): the goal is stated for it.
DEFAULT_ARM = "optuna-gp"
CHECKPOINTS = (8, 16, 32)


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
        scale = scale_of(problem)
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
        "normalized (reference point 1.1): an analytic problem by its true front (ideal -> 0, nadir -> 1), a "
        "measured table or the surrogate per objective from the front's best value (0) to the larger of the "
        "front's worst value and the median run (1) (runner.Scale.of_table). Cells: median "
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

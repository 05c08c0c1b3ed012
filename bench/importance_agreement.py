"""Importance from a study's 16 trials against importance from the whole measured table.

The goal of issue 15: the fANOVA ranking computed from a study's 16 trials names the same top
parameter as the one computed from the full table, for the held-out loss and for the costs the
hyperparameters move (trainable parameters, peak GPU memory). The full table is every measured
run of a learning-curve table at the step ``training.select: best`` keeps (its lowest held-out
loss); a 16-trial study is a Latin-hypercube design of 16 points in the default study's search
space (or, with ``--from-runs``, the default arm's first 16 trials of a bench/warm_start.py cold
run), each answered by the table as the ``table`` benchmark answers a trial (its nearest measured run,
``loratune.benchmarks.CurveTable.answer``), over ``--seeds`` seeds. Both go through
``loratune.importance.importance_table``, the function behind results/<study>/importance.tsv.

Run from the repository root (a few minutes on 2 shared cores):

    .venv/bin/python bench/importance_agreement.py
    .venv/bin/python bench/importance_agreement.py --from-runs bench/results/warm_start_<commit>_runs.tsv
    .venv/bin/python bench/importance_agreement.py --tables bench/data/curves_self_instruct.jsonl \
        bench/data/curves_gemma_self_instruct.jsonl --from-runs bench/results/warm_start_gemma_<commit>_runs.tsv

It prints a Markdown report and writes it to ``bench/results/importance_agreement.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.efficiency.problems import ALL_CURVE_TABLES, BENCH_PROBLEMS, TABLE_MODELS  # noqa: E402
from loratune.benchmarks import CurveTable  # noqa: E402
import yaml  # noqa: E402

from loratune.designs import pilot_design  # noqa: E402
from loratune.importance import UPDATE_SCALE, importance_table  # noqa: E402
from loratune.space import SearchSpace  # noqa: E402

TABLES = ["bench/data/curves_self_instruct.jsonl", "bench/data/curves_instructions.jsonl"]
# The goal's objectives: the held-out loss and the costs the hyperparameters move (a run's
# adapter size and its peak GPU memory). train_time is reported too, as what it is on these
# tables: the time of a run sharing the GPU with up to 13 others, noise the hyperparameters barely move.
OBJECTIVES = {"eval_loss": "min", "trainable_params": "min", "peak_memory_gib": "min"}
NOISE = {"train_time": "min"}


def full_table_trials(table: CurveTable, space) -> pd.DataFrame:
    """Every measured run at its best step, as the rows of a trials table."""
    rows = table.rows()
    keys = [*space.tunable_names, "seed"]
    best = rows.loc[rows.groupby(keys)["eval_loss"].idxmin()].reset_index(drop=True)
    best["trial_id"] = [f"{space.trial_id(r)}-s{r['seed']}" for r in best.to_dict("records")]
    best["status"] = ["ok" if s == "ok" else "failed" for s in best["status"]]
    # Every run is its own observation (the repeats differ in their training seed).
    return best.assign(seed=0)


def default_arm_points(runs: pd.DataFrame, table: CurveTable, space, n: int, seed: int) -> list[dict]:
    """The first ``n`` trials of the default arm's cold run of ``table`` with ``seed``, as
    bench/warm_start.py recorded them (``<out>_runs.tsv``, arm ``cold``): a study's trials
    gather where the proposer looked, unlike a Latin hypercube's."""
    problem = problem_of(table)
    if problem is None:
        raise SystemExit(f"--from-runs: {table.path} is the table of no bench problem, so no run names it")
    run = runs[(runs["problem"] == problem) & (runs["arm"] == "cold") & (runs["seed"] == seed)]
    run = run.sort_values("n_trials").head(n)
    if len(run) < n:
        raise SystemExit(f"--from-runs: {problem} seed {seed} has {len(run)} cold trials, not {n}")
    bench_space = BENCH_PROBLEMS[problem].space
    return [space.snap(bench_space.parse_trial_id(trial_id)) for trial_id in run["trial_id"]]


def problem_of(table: CurveTable) -> str | None:
    """The bench problem of a measured table (by file name), None for a table of no bench problem."""
    return next((name for name, t in ALL_CURVE_TABLES.items() if Path(t.path).name == Path(table.path).name), None)


def study_trials(table: CurveTable, space, points: list[dict], seed: int, objectives) -> pd.DataFrame:
    """The trials at ``points``, answered by the table."""
    rows = []
    for point in points:
        answer = table.answer(space, point, None, "best", seed=seed)
        rows.append(
            {
                **point,
                "seed": seed,
                "trial_id": space.trial_id(point),
                "status": answer.get("status", "ok"),
                **{name: answer.get(name) for name in objectives},
            }
        )
    return pd.DataFrame(rows)


def top(importance: pd.DataFrame, objective: str) -> str:
    ranked = importance[(importance["objective"] == objective) & (importance["rank"] == 1)]
    return str(ranked["parameter"].iloc[0]) if len(ranked) else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", nargs="+", default=TABLES)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument(
        "--from-runs",
        type=Path,
        help="take each seed's study from the default arm's cold runs a bench/warm_start.py run recorded "
        "(its _runs.tsv) instead of a Latin hypercube",
    )
    parser.add_argument("--output", default=str(REPO / "bench/results/importance_agreement.md"))
    args = parser.parse_args()
    missing = [path for path in args.tables if not Path(path).is_file()]
    if missing:
        raise SystemExit(f"--tables: no learning-curve table at {', '.join(missing)}")

    default = yaml.safe_load((REPO / "config/config.yaml").read_text(encoding="utf-8"))
    space = SearchSpace.from_config(default["search_space"])
    measured = {**OBJECTIVES, **NOISE}
    runs = pd.read_csv(args.from_runs, sep="\t") if args.from_runs else None
    design = (
        f"the first {args.trials} trials of the default arm's (optuna-gp) cold run per seed, from {args.from_runs}"
        if runs is not None
        else f"{args.trials} Latin-hypercube trials per seed"
    )
    lines = [
        "# Importance from 16 trials against the full table",
        "",
        f"Command: `{' '.join(['.venv/bin/python bench/importance_agreement.py', *sys.argv[1:]])}`.",
        "",
        f"fANOVA (``loratune.importance``), objectives {list(OBJECTIVES)} (the goal's) and {list(NOISE)} "
        f"(noise, below), space of the default study; {design}, {args.seeds} seeds. A table's train_time is "
        "the time of a run sharing the GPU with other runs "
        "(bench/data/README.md), which the hyperparameters barely move.",
        "",
    ]
    summary = []
    for path in args.tables:
        table = CurveTable(path)
        full = importance_table(full_table_trials(table, space), space, measured)
        model = TABLE_MODELS.get(problem_of(table) or "")
        lines += [
            f"## {path}" + (f" ({model})" if model else ""),
            "",
            "Full table (every run at its best step):",
            "",
            full.to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
        header = (
            "| seed | "
            + " | ".join(f"top for {o}" for o in measured)
            + " | "
            + " | ".join(f"{o}: {UPDATE_SCALE} share" for o in measured)
            + " |"
        )
        lines += [f"{args.trials}-trial studies:", "", header, "|" + "---|" * (1 + 2 * len(measured))]
        agree = {o: 0 for o in measured}
        for seed in range(args.seeds):
            if runs is None:
                points = pilot_design(space, args.trials, "lhs", seed)
            else:
                points = default_arm_points(runs, table, space, args.trials, seed)
            small = importance_table(study_trials(table, space, points, seed, measured), space, measured)
            tops = [top(small, o) for o in measured]
            shares = []
            for objective in measured:
                agree[objective] += top(small, objective) == top(full, objective)
                scale = small[(small["objective"] == objective) & (small["parameter"] == UPDATE_SCALE)]
                shares.append(f"{scale['importance_with_update_scale'].iloc[0]:.3f}" if len(scale) else "n/a")
            lines.append(f"| {seed} | " + " | ".join(tops) + " | " + " | ".join(shares) + " |")
        lines.append("")
        for o in measured:
            line = (
                f"- {o}: full-table top parameter **{top(full, o)}**; the {args.trials}-trial study names it first "
                f"in **{agree[o]} of {args.seeds}** seeds"
            )
            lines.append(line + (" (noise: not part of the goal)." if o in NOISE else "."))
            if o in OBJECTIVES:
                summary.append(f"| {Path(path).name} | {o} | {top(full, o)} | {agree[o]}/{args.seeds} |")
        lines.append("")
    lines += [
        "## Goal: the same top parameter",
        "",
        "| table | objective | full-table top | 16-trial studies agreeing |",
        "|---|---|---|---|",
        *summary,
        "",
    ]
    report = "\n".join(lines)
    print(report)
    Path(args.output).write_text(report + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

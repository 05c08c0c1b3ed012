"""Warm start against cold start: one measured table searched after a study of the other.

A pair of learning-curve tables of the same design (bench/data/README.md, ``--pair``): SmolLM2-135M
on two datasets (the default), or SmolLM2-135M and Gemma 3 270M on the self-instruct tasks
(``--pair table_self_instruct,table_gemma_self_instruct``). To a study of one, a study of the other is a
*related task*. Per seed:

- **cold**: the default arm (optuna-gp) on the target table from its Latin-hypercube pilot
  (``--pilot``), batches of ``--batch`` up to ``--budget`` trials: bench/efficiency's runner,
  the workflow's own round step (``loratune.loop.next_proposals``);
- **source**: the cold run of the *other* table with the same seed; its trials are the
  related rows (``loratune.warm_start.related_rows`` gives a study the same columns); with
  ``--source table``, every measured point of the other table instead (a finished study of it);
- **warm-<transfer>**: the same arm on the target with a pilot of ``--warm-pilot`` points,
  every round fitting the source's trials as ``transfer`` says (``warm_start.TRANSFERS``).

Hypervolume as in bench/search_efficiency.py (the target table's true front, on the table's scale
``Scale.of_table``, ref 1.1),
objectives eval_loss min and trainable_params min. The goal (issue 15): warm-started, the arm
reaches the cold start's 16-trial hypervolume within 6 trials (per seed: the first trial count
whose HV reaches that seed's cold HV@16; median over seeds), and its median HV is never below
the cold start's at any trial count, in each direction.

    .venv/bin/python bench/warm_start.py            # 10 seeds, both directions (bench/results/warm_start_<commit>.md)
    .venv/bin/python bench/warm_start.py --pair table_self_instruct,table_gemma_self_instruct \
        --out bench/results/warm_start_gemma_<commit>        # across models

Runs recorded at ``--out`` (``<out>_runs.tsv``) are kept and not run again: a new transfer costs only
its own runs (the plan must be the one they were run with).
"""

from __future__ import annotations

if __package__:  # imported as bench.<script>
    from bench._preamble import REPO
else:  # run as python bench/<script>.py
    from _preamble import REPO

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.efficiency.problems import ALL_CURVE_TABLES, BENCH_PROBLEMS, CURVE_TABLES, TABLE_MODELS  # noqa: E402
from bench.efficiency.report import trials_to_reach  # noqa: E402
from bench.efficiency.runner import ARMS, Plan, Task, _quiet_worker, add_hypervolume, run_task, scale_of  # noqa: E402
from loratune.benchmarks import get_problem  # noqa: E402
from loratune.warm_start import TRANSFERS  # noqa: E402

RESULTS = REPO / "bench" / "results"
ARM = "optuna-gp"  # the workflow's default arm
GOAL_TRIALS = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pair",
        default=",".join(CURVE_TABLES),
        help=f"the two tables, each warm-started from the other (of {','.join(ALL_CURVE_TABLES)}; "
        f"default {','.join(CURVE_TABLES)})",
    )
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="start at this seed (another process runs the others)"
    )
    parser.add_argument("--pilot", type=int, default=4, help="the cold start's pilot (default 4, as search_efficiency)")
    parser.add_argument("--warm-pilot", type=int, default=0, help="the warm start's pilot (default 0)")
    parser.add_argument("--batch", type=int, default=2, help="proposals per round (default 2)")
    parser.add_argument(
        "--warm-batch", type=int, default=None, help="the warm start's proposals per round (default --batch)"
    )
    parser.add_argument("--budget", type=int, default=16, help="trials per run, pilot included (default 16)")
    parser.add_argument("--transfers", default=",".join(TRANSFERS), help=f"of {','.join(TRANSFERS)}")
    parser.add_argument(
        "--source",
        choices=("run", "table"),
        default="run",
        help="the related rows: the other table's cold run with the same seed (run, default), or "
        "every measured point of the other table (table)",
    )
    parser.add_argument(
        "--warm-arm",
        default=ARM,
        help=f"the arm of the warm runs (default {ARM}, the cold runs' arm); another is labelled warm-<arm>-<transfer>",
    )
    parser.add_argument(
        "--reference-arms",
        default="",
        help="more arms run cold, as references (labelled cold-<arm>), e.g. the warm arm's own cold start",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "warm_start", help="output path without suffix")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="write the .md from the runs recorded so far in <out>_runs.tsv (seeds whose every run finished)",
    )
    args = parser.parse_args(argv)
    args.tables = pair_of(args.pair)
    args.references = [a for a in args.reference_arms.split(",") if a]
    if args.warm_batch is None:
        args.warm_batch = args.batch
    for arm in [args.warm_arm, *args.references]:
        if arm not in ARMS:
            raise SystemExit(f"--warm-arm, --reference-arms: expected arms of {list(ARMS)}, got {arm!r}")
    return args


def pair_of(text: str) -> list[str]:
    """The two table problems ``--pair`` names, checked before any run."""
    tables = text.split(",")
    if len(tables) != 2 or tables[0] == tables[1] or not set(tables) <= set(ALL_CURVE_TABLES):
        raise SystemExit(f"--pair: expected two different tables of {list(ALL_CURVE_TABLES)}, got {text!r}")
    for name in tables:
        reason = BENCH_PROBLEMS[name].skip_reason()
        if reason:
            raise SystemExit(f"--pair: {name}: {reason}")
    return tables


def related_from(run: list[dict], problem: str) -> pd.DataFrame:
    """A finished run's trials as related rows: parameters, objectives, status."""
    spec = BENCH_PROBLEMS[problem]
    space = spec.space
    rows = []
    for row in run:
        values = {name: row[f"true_{name}"] for name in spec.objectives}  # noise-free tables: observed = true
        rows.append({**space.parse_trial_id(row["trial_id"]), **values, "status": row["status"]})
    return pd.DataFrame(rows)


def related_table(problem: str) -> pd.DataFrame:
    """Every measured point of a table as related rows (``--source table``): what a study of
    seed 0 sees at the full budget, failed (diverged) runs as failed rows."""
    spec = BENCH_PROBLEMS[problem]
    space = spec.space
    points, _ = get_problem(spec.problem).points(space)
    rows = []
    for point in points.to_dict("records"):
        point = space.snap(point)
        observed, _ = spec.observe(space, point, 0)
        values = {name: observed[name] for name in spec.objectives} if observed else {}
        rows.append({**point, **values, "status": "ok" if observed else "failed"})
    return pd.DataFrame(rows)


def _cold(args: tuple[str, int, Plan, str]) -> tuple[str, int, list[dict]]:
    problem, seed, plan, arm = args
    return problem, seed, [{**r, "arm": cold_label(arm)} for r in run_task(Task(problem, ARMS[arm], seed, plan))]


def cold_label(arm: str) -> str:
    return "cold" if arm == ARM else f"cold-{arm}"


def warm_label(arm: str, transfer: str) -> str:
    return f"warm-{transfer}" if arm == ARM else f"warm-{arm}-{transfer}"


def _warm(args: tuple[str, int, Plan, str, pd.DataFrame, str]) -> tuple[str, int, str, list[dict]]:
    problem, seed, plan, transfer, related, arm = args
    rows = run_task(Task(problem, ARMS[arm], seed, plan), related=related, transfer=transfer)
    for row in rows:
        row["arm"] = warm_label(arm, transfer)
    return problem, seed, transfer, rows


def summarize(curves: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Per target and arm: median HV at each trial count, and the trials to reach each seed's
    cold HV@budget (median over seeds)."""
    out = []
    for problem, per_problem in curves.groupby("problem", sort=False):
        cold = per_problem[per_problem["arm"] == "cold"]
        targets = cold[cold["n_trials"] == budget].set_index("seed")["hv_ratio"]
        for arm, per_arm in per_problem.groupby("arm", sort=False):
            medians = per_arm.groupby("n_trials")["hv_ratio"].median()
            reach = [trials_to_reach(run, targets[seed]) for seed, run in per_arm.groupby("seed")]
            out.append(
                {
                    "problem": problem,
                    "arm": arm,
                    "seeds": per_arm["seed"].nunique(),
                    "reach_median": float(np.median(reach)),
                    "reach": reach,
                    **{f"hv{n}": float(medians.get(n, np.nan)) for n in range(1, budget + 1)},
                }
            )
    return pd.DataFrame(out)


def markdown(summary: pd.DataFrame, args: argparse.Namespace, command: str, elapsed: float) -> str:
    lines = [
        f"# Warm start against cold start on {' and '.join(args.tables)}",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min wall clock, 2 shared CPU cores).",
        "",
        f"Protocol: {args.seeds} seeds; objectives eval_loss min, trainable_params min; arm {ARM} (the default). "
        f"cold: a {args.pilot}-point Latin-hypercube pilot, then batches of {args.batch} to {args.budget} trials. "
        f"warm-<transfer>: a {args.warm_pilot}-point pilot, then batches of {args.warm_batch} of "
        f"{'the same arm' if args.warm_arm == ARM else f'the arm {args.warm_arm}'}, every round fitting "
        + (
            "every measured point of the *other* table as a related task "
            if args.source == "table"
            else f"the {args.budget} trials of the *other* table's cold run with the same seed as a related task "
        )
        + "(loratune.warm_start.transfer_history). "
        + (f"cold-<arm>: the arm {', '.join(args.references)} run as cold is, a reference. " if args.references else "")
        + "HV: hypervolume of the noise-free values found so far over "
        "the target's true front's (1 = the whole front), on the table's scale (bench/efficiency/runner.py "
        "Scale.of_table: per objective the front's best value -> 0, the larger of the front's worst value and "
        "the median over all the table's runs -> 1, reference point 1.1). 'reach': trials until a run's HV "
        f"reaches the same seed's cold HV@{args.budget} (median over seeds, inf: never within the budget).",
        "",
    ]
    checkpoints = [n for n in (2, 4, 6, 8, 10, 12, 14, 16) if n <= args.budget]
    for problem, rows in summary.groupby("problem", sort=False):
        source = [name for name in args.tables if name != problem][0]
        lines += [f"## {problem} ({TABLE_MODELS[problem]}) warm-started from {source} ({TABLE_MODELS[source]})", ""]
        lines.append("| arm | reach (median) | " + " | ".join(f"HV@{n}" for n in checkpoints) + " |")
        lines.append("|---|---|" + "---|" * len(checkpoints))
        for row in rows.itertuples(index=False):
            cells = " | ".join(f"{getattr(row, f'hv{n}'):.3f}" for n in checkpoints)
            lines.append(f"| {row.arm} | {row.reach_median:g} | {cells} |")
        cold = rows[rows["arm"] == "cold"].iloc[0]
        for row in rows[~rows["arm"].str.startswith("cold")].itertuples(index=False):
            below = [n for n in range(1, args.budget + 1) if getattr(row, f"hv{n}") < cold[f"hv{n}"] - 1e-12]
            met = row.reach_median <= GOAL_TRIALS and not below
            lines.append(
                f"\n{row.arm}: reaches cold HV@{args.budget} in {row.reach_median:g} trials (median; per seed "
                f"{[int(r) if np.isfinite(r) else 'inf' for r in row.reach]}); median HV below cold at "
                f"{below or 'no'} trial count(s). Goal (<= {GOAL_TRIALS} trials, never below): "
                f"{'met' if met else 'not met'}."
            )
        lines.append("")
    return "\n".join(lines)


def render(args: argparse.Namespace, command: str, elapsed: float) -> str:
    """The curves and the report from the runs recorded so far, over the seeds every run of
    which (cold and warm, both directions) has finished."""
    tables = args.tables
    arms = ["cold", *map(cold_label, args.references), *(warm_label(args.warm_arm, t) for t in args.transfers.split(","))]
    rows = pd.read_csv(str(args.out) + "_runs.tsv", sep="\t")
    rows = rows[rows["arm"].isin(arms) & rows["problem"].isin(tables)]
    runs = rows.groupby("seed")[["problem", "arm"]].apply(lambda t: len(t.drop_duplicates()))
    expected = len(tables) * len(arms)
    complete = sorted(runs.index[runs == expected])
    if not complete:
        raise SystemExit(f"{args.out}_runs.tsv: no seed has finished every run of {arms} on {tables}")
    rows = rows[rows["seed"].isin(complete)]
    args.seeds = len(complete)
    scales = {p: scale_of(BENCH_PROBLEMS[p]) for p in tables}
    curves = add_hypervolume(rows, scales)
    curves.to_csv(args.out.with_suffix(".tsv"), sep="\t", index=False)
    text = markdown(summarize(curves, args.budget), args, command, elapsed)
    text = text.replace("\n\nProtocol:", f"\n\nSeeds finished: {complete}.\n\nProtocol:", 1)
    args.out.with_suffix(".md").write_text(text + "\n")
    return text


def _recorded(args: argparse.Namespace) -> tuple[list[dict], set[tuple[str, int, str]]]:
    """The runs an earlier bench at ``--out`` recorded with the same plan (its ``_runs.tsv``), and
    their (problem, seed, arm): they are kept, not run again, so that measuring one more transfer
    costs only its own runs."""
    path = Path(str(args.out) + "_runs.tsv")
    if not path.is_file():
        return [], set()
    rows = pd.read_csv(path, sep="\t").to_dict("records")
    # A warm run is recorded by its target alone: runs of another pair would pass for this pair's.
    others = sorted({r["problem"] for r in rows} - set(args.tables))
    if others:
        raise SystemExit(
            f"--out: {path} holds runs of {others}, not of --pair {args.pair}; give each pair its own --out"
        )
    return rows, {(r["problem"], int(r["seed"]), r["arm"]) for r in rows}


def _record(rows: list[dict], args: argparse.Namespace) -> None:
    """Every finished run so far, so that a long bench stopped early keeps what it measured."""
    pd.DataFrame(rows).to_csv(str(args.out) + "_runs.tsv", sep="\t", index=False)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render_only:
        command = " ".join([".venv/bin/python bench/warm_start.py", *(sys.argv[1:] if argv is None else argv)])
        print(render(args, command, float("nan")), flush=True)
        return
    tables = args.tables
    transfers = args.transfers.split(",")
    cold_plan = Plan(args.seeds, args.pilot, args.batch, args.budget)
    warm_plan = Plan(args.seeds, args.warm_pilot, args.warm_batch, args.budget)
    command = " ".join([".venv/bin/python bench/warm_start.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    log_path = str(args.out) + "_workers.log"
    context = multiprocessing.get_context("spawn")
    runs: dict[tuple[str, int], list[dict]] = {}
    rows, done = _recorded(args)
    # --source table: the same related rows for every seed, read once
    whole_tables = {source: related_table(source) for source in tables} if args.source == "table" else None
    with context.Pool(args.workers, initializer=_quiet_worker, initargs=(log_path,)) as pool:
        # Seed by seed (its two cold runs, then its warm runs, which fit the other table's cold
        # run), so that a bench stopped early leaves whole seeds behind.
        for seed in range(args.first_seed, args.seeds):
            cold_jobs = [
                (t, seed, cold_plan, arm)
                for arm in [ARM, *args.references]
                for t in tables
                if (t, seed, cold_label(arm)) not in done
            ]
            for problem, _, run in pool.map(_cold, cold_jobs):
                rows += run
            for problem in tables:
                runs[(problem, seed)] = [
                    r for r in rows if (r["problem"], r["seed"], r["arm"]) == (problem, seed, "cold")
                ]
            related = whole_tables or {source: related_from(runs[(source, seed)], source) for source in tables}
            warm_jobs = [
                (target, seed, warm_plan, transfer, related[source], args.warm_arm)
                for target in tables
                for source in tables
                if source != target
                for transfer in transfers
                if (target, seed, warm_label(args.warm_arm, transfer)) not in done
            ]
            for _, _, _, run in pool.map(_warm, warm_jobs):
                rows += run
            _record(rows, args)
            print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    print(render(args, command, time.perf_counter() - started), flush=True)


if __name__ == "__main__":
    main()

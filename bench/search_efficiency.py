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

if __package__:  # imported as bench.<script>
    from bench._preamble import REPO
else:  # run as python bench/<script>.py
    from _preamble import REPO

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from bench.efficiency.problems import BENCH_PROBLEMS  # noqa: E402
from bench.efficiency.report import bounds, figure, markdown, summarize  # noqa: E402
from bench.efficiency.runner import (  # noqa: E402
    ARMS,
    Arm,
    Plan,
    Task,
    _quiet_worker,
    _run_tagged,
    add_hypervolume,
    measure_timing,
    scale_of,
)

RESULTS = REPO / "bench" / "results"


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

    curves = add_hypervolume(pd.DataFrame(rows), scales_of(problems))
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


def scales_of(problems: list[str]) -> dict:
    return {name: scale_of(BENCH_PROBLEMS[name]) for name in problems}


def render(args: argparse.Namespace, plan: Plan, labels: list[str], skipped: dict[str, str], command: str) -> None:
    """Write the report again from the curves and timing of an earlier run (e.g. after the default arm changed),
    the hypervolumes scored again from the recorded true values on today's scales (``scale_of``)."""
    curves = pd.read_csv(args.out.with_suffix(".tsv"), sep="\t").drop(columns="hv_ratio")
    curves = add_hypervolume(curves, scales_of(list(dict.fromkeys(curves["problem"]))))
    curves.to_csv(args.out.with_suffix(".tsv"), sep="\t", index=False)
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


if __name__ == "__main__":
    main()

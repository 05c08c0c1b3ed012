"""LoRA-aware search coordinates against the raw ones: the default arm (optuna-gp) on the measured
tables with ``coordinates: raw`` and ``lora`` (``rslora`` on request), seed by seed.

Every run is bench/efficiency's runner (``run_task``: a ``--pilot``-point Latin-hypercube
pilot, then batches of ``--batch`` to ``--budget`` trials through the workflow's round step),
scored on the problem's hypervolume scale (``runner.scale_of``; a table's: ``Scale.of_table``).
Finished runs are recorded in ``<out>_runs.tsv`` after each one and never run again, and
``--reuse`` takes raw runs another bench recorded with the same plan (bench/warm_start.py's
``cold`` runs are exactly the raw arm), so that only the new coordinates cost time.

    .venv/bin/python bench/coordinates.py --reuse bench/results/warm_start_runs.tsv
"""

from __future__ import annotations

if __package__:  # imported as bench.<script>
    from bench._preamble import REPO
else:  # run as python bench/<script>.py
    from _preamble import REPO

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.efficiency.problems import BENCH_PROBLEMS, CURVE_TABLES  # noqa: E402
from bench.efficiency.runner import Arm, Plan, Task, add_hypervolume, run_task, scale_of  # noqa: E402
from loratune.proposers.coordinates import COORDINATES  # noqa: E402

RESULTS = REPO / "bench" / "results"
CHECKPOINTS = (4, 6, 8, 10, 12, 14, 16)


def arm(coordinates: str) -> Arm:
    """The default arm in ``coordinates`` (raw: the default arm as it is)."""
    if coordinates == "raw":
        return Arm("raw", "optuna", '{"sampler": "gp"}')
    return Arm(coordinates, "optuna", f'{{"sampler": "gp", "coordinates": "{coordinates}"}}')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default=",".join(CURVE_TABLES), help=f"of {','.join(BENCH_PROBLEMS)}")
    parser.add_argument("--coordinates", default="raw,lora", help=f"of {','.join(COORDINATES)}")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--pilot", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--reuse", type=Path, help="a runs .tsv whose 'cold' runs are this plan's raw runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "coordinates", help="output path without suffix")
    parser.add_argument("--render-only", action="store_true", help="write the .md from <out>_runs.tsv")
    return parser.parse_args(argv)


def recorded(args: argparse.Namespace) -> pd.DataFrame:
    """The runs recorded at ``--out``, with ``--reuse``'s cold runs as raw ones."""
    parts = []
    path = Path(str(args.out) + "_runs.tsv")
    if path.is_file():
        parts.append(pd.read_csv(path, sep="\t"))
    if args.reuse:
        cold = pd.read_csv(args.reuse, sep="\t")
        parts.append(cold[cold["arm"] == "cold"].assign(arm="raw"))
    if not parts:
        return pd.DataFrame(columns=["problem", "arm", "seed"])
    rows = pd.concat(parts, ignore_index=True)
    return rows.drop_duplicates(["problem", "arm", "seed", "n_trials"])


def summarize(curves: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Per problem and coordinates: the median HV at each checkpoint, the mean HV over trials 1..budget
    (the area under the curve, median over seeds), and per seed whether it beats raw on that area."""
    out = []
    for problem, per_problem in curves.groupby("problem", sort=False):
        area = per_problem.groupby(["arm", "seed"])["hv_ratio"].mean()
        for name, per_arm in per_problem.groupby("arm", sort=False):
            medians = per_arm.groupby("n_trials")["hv_ratio"].median()
            seeds = sorted(per_arm["seed"].unique())
            better = sum(area[(name, s)] > area[("raw", s)] + 1e-12 for s in seeds if ("raw", s) in area)
            worse = sum(area[(name, s)] < area[("raw", s)] - 1e-12 for s in seeds if ("raw", s) in area)
            out.append(
                {
                    "problem": problem,
                    "coordinates": name,
                    "seeds": len(seeds),
                    "area": float(np.median([area[(name, s)] for s in seeds])),
                    "better": better,
                    "worse": worse,
                    **{f"hv{n}": float(medians.get(n, np.nan)) for n in CHECKPOINTS if n <= budget},
                }
            )
    return pd.DataFrame(out)


def markdown(summary: pd.DataFrame, args: argparse.Namespace, command: str) -> str:
    checkpoints = [n for n in CHECKPOINTS if n <= args.budget]
    lines = [
        "# LoRA-aware coordinates against raw ones (optuna-gp)",
        "",
        f"Command: `{command}`.",
        "",
        f"Protocol: per seed a {args.pilot}-point Latin-hypercube pilot, then optuna-gp in batches of {args.batch} "
        f"to {args.budget} trials; 'raw': each parameter on its own (log) scale (the default), 'lora': "
        "log(lr * alpha / rank), log rank, log alpha, 'rslora': alpha / sqrt(rank) "
        "(loratune/proposers/coordinates.py). HV: hypervolume of the noise-free values found so far over the "
        "true front's, on the problem's scale (bench/efficiency/runner.py scale_of). 'area': the mean HV over "
        f"trials 1..{args.budget} (median over seeds); 'better/worse': seeds whose area is above/below raw's "
        "with the same seed.",
        "",
    ]
    for problem, rows in summary.groupby("problem", sort=False):
        lines += [f"## {problem}", "", BENCH_PROBLEMS[problem].about + ".", ""]
        lines.append(
            "| coordinates | seeds | area | better / worse than raw | "
            + " | ".join(f"HV@{n}" for n in checkpoints)
            + " |"
        )
        lines.append("|---|---|---|---|" + "---|" * len(checkpoints))
        for row in rows.itertuples(index=False):
            cells = " | ".join(f"{getattr(row, f'hv{n}'):.3f}" for n in checkpoints)
            versus = "-" if row.coordinates == "raw" else f"{row.better} / {row.worse}"
            lines.append(f"| {row.coordinates} | {row.seeds} | {row.area:.3f} | {versus} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def render(args: argparse.Namespace, command: str) -> str:
    """The report over the seeds whose every requested run has finished."""
    names = args.coordinates.split(",")
    problems = args.problems.split(",")
    rows = recorded(args)
    rows = rows[rows["arm"].isin(names) & rows["problem"].isin(problems)]
    runs = rows.groupby("seed")[["problem", "arm"]].apply(lambda t: len(t.drop_duplicates()))
    complete = sorted(runs.index[runs == len(names) * len(problems)])
    rows = rows[rows["seed"].isin(complete)]
    curves = add_hypervolume(rows, {p: scale_of(BENCH_PROBLEMS[p]) for p in problems})
    curves.to_csv(args.out.with_suffix(".tsv"), sep="\t", index=False)
    text = markdown(summarize(curves, args.budget), args, command)
    text = text.replace("\n\nProtocol:", f"\n\nSeeds finished: {complete}.\n\nProtocol:", 1)
    args.out.with_suffix(".md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = " ".join([".venv/bin/python bench/coordinates.py", *(sys.argv[1:] if argv is None else argv)])
    command = command.replace(" --render-only", "")
    if not args.render_only:
        logging.disable(logging.WARNING)
        plan = Plan(args.seeds, args.pilot, args.batch, args.budget)
        rows = recorded(args)
        done = set(zip(rows["problem"], rows["seed"].astype(int), rows["arm"]))
        new = [r for r in rows.to_dict("records") if not args.reuse or r["arm"] != "raw"]
        for seed in range(args.seeds):
            for problem in args.problems.split(","):
                for name in args.coordinates.split(","):
                    if (problem, seed, name) in done:
                        continue
                    new += run_task(Task(problem, arm(name), seed, plan))
                    pd.DataFrame(new).to_csv(str(args.out) + "_runs.tsv", sep="\t", index=False)
                    print(f"{problem} {name} seed {seed} done", flush=True)
    print(render(args, command), flush=True)


if __name__ == "__main__":
    main()

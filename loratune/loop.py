"""The steps of one study round, as plain functions of files: what each Snakemake rule calls.

Round 0 of every seed is the shared pilot; round r of an arm sees the pilot and the arm's own
rounds < r. Each step reads its inputs, computes, and writes its outputs atomically.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from loratune import ledger
from loratune.config import Study
from loratune.designs import pilot_design

log = logging.getLogger("loratune")

PILOT = "pilot"


def round_seed(seed: int, arm: str, round_: int) -> int:
    """A proposer seed per (study seed, arm, round), stable across processes and machines."""
    sequence = np.random.SeedSequence([seed, zlib.crc32(arm.encode()), round_])
    return int(sequence.generate_state(1)[0])


def proposals_frame(study: Study, points: Iterable[Mapping], seed: int, arm: str, round_: int) -> pd.DataFrame:
    rows = [
        {"seed": seed, "arm": arm, "round": round_, "trial_id": study.space.trial_id(p), **study.space.snap(p)}
        for p in points
    ]
    return pd.DataFrame(rows, columns=["seed", "arm", "round", "trial_id", *study.space.names])


def sample_pilot(study: Study, seed: int, output: str | Path) -> pd.DataFrame:
    pilot = study.config["pilot"]
    points = pilot_design(study.space, pilot["n"], pilot["design"], seed)
    frame = proposals_frame(study, points, seed, PILOT, 0)
    ledger.write_table(frame, output)
    log.info("pilot of seed %d: %d trials (%s)", seed, len(frame), pilot["design"])
    return frame


def propose_round(
    study: Study, arm_name: str, seed: int, round_: int, history_path: str | Path, output: str | Path
) -> pd.DataFrame:
    from loratune.proposers import make_proposer

    arm = study.arm(arm_name)
    history = ledger.read_table(history_path)
    proposer = make_proposer(
        arm.proposer,
        space=study.space,
        objectives=study.objectives,
        seed=round_seed(seed, arm_name, round_),
        **arm.options,
    )
    started = time.perf_counter()
    points = proposer.propose(history, n=arm.batch_size)
    frame = proposals_frame(study, points, seed, arm_name, round_)
    ledger.write_table(frame, output)
    log.info(
        "%s round %d of seed %d: %d proposals from %d trials of history in %.1f s",
        arm_name, round_, seed, len(frame), len(history), time.perf_counter() - started,
    )
    for point in points:
        log.info("  %s", study.space.describe(point))
    return frame


def update_history(
    previous_path: str | Path | None,
    proposals_path: str | Path,
    metrics_paths: Iterable[str | Path],
    output: str | Path,
) -> pd.DataFrame:
    proposals = ledger.read_table(proposals_path)
    metrics = {}
    for path in metrics_paths:
        try:
            record = ledger.read_metrics(path)
        except (FileNotFoundError, ValueError) as error:
            # Found at the start of a run, such a file moves aside and its trial trains again.
            raise ValueError(f"{error}; run the study again to retrain that trial") from None
        metrics[Path(path).parent.name] = record
    previous = ledger.read_table(previous_path) if previous_path else None
    history = ledger.build_history(previous, proposals, metrics)
    ledger.write_table(history, output)
    return history


def aggregate(
    study: Study,
    history_paths: Iterable[str | Path],
    trials_output: str | Path,
    hypervolume_output: str | Path,
    pareto_output: str | Path,
) -> pd.DataFrame:
    """The tidy table of every trial, the hypervolume curves and the Pareto set of the study."""
    from loratune.pareto import hypervolume_curves, pareto_front

    trials = ledger.collect_trials(ledger.read_table(p) for p in history_paths)
    ledger.write_table(trials, trials_output)
    ledger.write_table(hypervolume_curves(trials, study.objectives), hypervolume_output)
    # One front per seed (each seed is a repeat of the whole study), all arms together.
    unique = trials.drop_duplicates(["seed", "trial_id"])
    fronts = [pareto_front(unique[unique.seed == seed], study.objectives) for seed in study.seeds]
    ledger.write_table(pd.concat(fronts, ignore_index=True), pareto_output)
    return trials


def export_gptune_db(study: Study, history_path: str | Path, output: str | Path, arm: str, seed: int) -> dict:
    history = ledger.read_table(history_path)
    database = ledger.to_gptune_db(history, study.space, study.objectives, f"{study.name}-{arm}-seed{seed}")
    ledger.atomic_write_json(output, database)
    return database


def plot_pareto(study: Study, trials_path: str | Path, output: str | Path) -> None:
    from loratune import plots

    trials = ledger.read_table(trials_path)
    plots.write_html(plots.pareto_figure(trials, study.objectives, study.space), output)


def plot_hypervolume(curves_path: str | Path, output: str | Path) -> None:
    from loratune import plots

    plots.write_html(plots.hypervolume_figure(ledger.read_table(curves_path)), output)


def plot_pareto_table(study: Study, trials_path: str | Path, output: str | Path) -> None:
    from loratune import plots

    trials = ledger.read_table(trials_path)
    plots.write_html(plots.pareto_table_figure(trials, study.objectives, study.space), output)


def summary_text(study: Study, front: pd.DataFrame, report_path: str | Path) -> str:
    columns = [c for c in ["seed", "arm", "trial_id", *study.objectives] if c in front.columns]
    table = front[columns].to_string(index=False) if len(front) else "(no successful trial)"
    directions = ", ".join(f"{name} ({sense})" for name, sense in study.objectives.items())
    return (
        f"Pareto set of study {study.name!r} over {directions}:\n{table}\n"
        f"Report: {Path(report_path).resolve()}\n"
    )


def write_report(
    study: Study,
    trials_path: str | Path,
    curves_path: str | Path,
    pareto_path: str | Path,
    output: str | Path,
) -> str:
    """The study's one-page HTML report, and summary.txt beside it (printed at the end of a run)."""
    from loratune import plots

    trials = ledger.read_table(trials_path)
    curves = ledger.read_table(curves_path)
    front = ledger.read_table(pareto_path)
    html = plots.report_html(
        f"loratune study {study.name}",
        [
            ("Pareto fronts", plots.pareto_figure(trials, study.objectives, study.space)),
            ("Hypervolume against trials", plots.hypervolume_figure(curves)),
            ("Pareto set", plots.pareto_table_figure(trials, study.objectives, study.space)),
        ],
    )
    ledger.atomic_write_text(output, html)
    summary = summary_text(study, front, output)
    ledger.atomic_write_text(Path(output).parent / "summary.txt", summary)
    return summary

"""The steps of one study round, as plain functions of files: what each Snakemake rule calls.

Round 0 of every seed is the shared pilot; round r of an arm sees the pilot and the arm's own
rounds < r. Each step reads its inputs, computes, and writes its outputs atomically.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from loratune import files, ledger
from loratune.config import Arm, Study
from loratune.designs import pilot_design
from loratune.early_stopping import STOPPED, promotion, rung_results
from loratune.ledger import PILOT
from loratune.space import SearchSpace

log = logging.getLogger("loratune")


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


def sample_pilot(study: Study, seed: int, output: str | Path, trials_dir: str | Path | None = None) -> pd.DataFrame:
    """The pilot's proposals. With same-setting warm-start sources, their trials lead the
    proposals as observations whose ``metrics.json`` (in ``trials_dir``) is written here from
    the source, so that no job trains them; the design then adds ``pilot.n`` minus their number
    (at least 0) new points that no source measured."""
    from loratune import warm_start

    pilot = study.config["pilot"]
    observed = (
        warm_start.observations(study.config, study.space, study.objectives, seed) if study.config["warm_start"] else []
    )
    if observed and trials_dir is None:
        raise ValueError("sample_pilot: warm-start observations need the trials folder to record them in")
    for record in observed:
        path = Path(trials_dir) / record["trial_id"] / "metrics.json"
        # Rewritten only when it changes: a newer metrics.json would rebuild every history after it.
        if not path.is_file() or ledger.read_metrics(path) != files.jsonable(record):
            files.atomic_write_json(path, record)
    taken = {study.space.key(study.space.snap(r)) for r in observed}
    n_new = warm_start.pilot_size(pilot["n"], len(observed))
    design = pilot_design(study.space, pilot["n"], pilot["design"], seed) if n_new else []
    new = [p for p in design if study.space.key(p) not in taken][:n_new]
    frame = proposals_frame(study, [*observed, *new], seed, PILOT, 0)
    ledger.write_table(frame, output)
    log.info(
        "pilot of seed %d: %d new trials (%s), %d warm-start observations",
        seed,
        len(new),
        pilot["design"],
        len(observed),
    )
    return frame


def next_proposals(
    space: SearchSpace,
    objectives: Mapping[str, str],
    arm: Arm,
    history: pd.DataFrame | None,
    seed: int,
    round_: int,
    n: int | None = None,
    stopped: str | None = None,
    related: pd.DataFrame | None = None,
    transfer: str | None = None,
) -> list[dict]:
    """The points ``arm`` proposes for round ``round_`` of study seed ``seed``: a pure step
    (no files), shared by the workflow's propose job and the benchmarks, so both run the same
    code. The proposer is seeded by ``round_seed``; ``n`` defaults to the arm's batch size (a
    benchmark's last round may ask for fewer); ``stopped`` says how trials stopped at a rung
    are fitted (``proposers.base.STOPPED_FITS``; default ``STOPPED_FIT``). ``related`` holds a
    related task's rows (``warm_start.related_rows``), which the proposer fits before the
    history as ``transfer`` says (``warm_start.TRANSFERS``; default ``warm_start.TRANSFER``)."""
    from loratune.proposers import make_proposer
    from loratune.proposers.base import STOPPED_FIT, fitting_history
    from loratune.warm_start import TRANSFER, transfer_history

    proposer = make_proposer(
        arm.proposer, space=space, objectives=objectives, seed=round_seed(seed, arm.name, round_), **arm.options
    )
    fitted = transfer_history(
        space, objectives, fitting_history(history, stopped or STOPPED_FIT), related, transfer or TRANSFER
    )
    return proposer.propose(fitted, n=arm.batch_size if n is None else n)


def propose_round(
    study: Study, arm_name: str, seed: int, round_: int, history_path: str | Path, output: str | Path
) -> pd.DataFrame:
    from loratune.warm_start import related_rows

    history = ledger.read_table(history_path)
    related = related_rows(study.config, study.space, study.objectives, seed) if study.config["warm_start"] else None
    started = time.perf_counter()
    points = next_proposals(study.space, study.objectives, study.arm(arm_name), history, seed, round_, related=related)
    frame = proposals_frame(study, points, seed, arm_name, round_)
    ledger.write_table(frame, output)
    log.info(
        "%s round %d of seed %d: %d proposals from %d trials of history in %.1f s",
        arm_name,
        round_,
        seed,
        len(frame),
        len(history),
        time.perf_counter() - started,
    )
    for point in points:
        log.info("  %s", study.space.describe(point))
    return frame


def evaluation_columns(path: str | Path, objectives: Mapping[str, str]) -> dict[str, Any]:
    """The lm-eval metrics of an evaluation.json as a trial's columns, and its status."""
    from loratune.evaluation import harness

    evaluation = json.loads(Path(path).read_text(encoding="utf-8"))
    return {**harness.flatten(evaluation, objectives), "evaluation_status": evaluation.get("status")}


def update_history(
    previous_path: str | Path | None,
    proposals_path: str | Path,
    metrics_paths: Iterable[str | Path],
    output: str | Path,
    outcomes_path: str | Path | None = None,
    evaluation_paths: Iterable[str | Path] = (),
    objectives: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The arm's history through this round. With early stopping, ``outcomes_path`` (the round's
    last promoted.tsv) says which trials stopped at a rung: their metrics are those of the
    highest rung they reached, and their status becomes ``stopped`` (a failed one stays failed);
    every trial of the round gets ``rung``, the index of the highest rung it reached (with
    ``steps``, ``max_steps`` and ``best_step`` from its metrics).
    A trial's lm-eval metrics (its evaluation.json beside the metrics.json it was scored on, a
    stopped trial's at its rung) join its row as ``lm_eval.<task>.<metric>`` columns, NaN where
    evaluation failed."""
    proposals = ledger.read_table(proposals_path)
    metrics, trial_of_folder = {}, {}
    for path in metrics_paths:
        try:
            record = ledger.read_metrics(path)
        except (FileNotFoundError, ValueError) as error:
            # Found at the start of a run, such a file moves aside and its trial trains again.
            raise ValueError(f"{error}; run the study again to retrain that trial") from None
        trial = record.get("trial_id") or Path(path).parent.name
        metrics[trial], trial_of_folder[Path(path).parent] = record, trial
    if outcomes_path:
        outcomes = ledger.read_table(outcomes_path)
        for row in outcomes.itertuples(index=False):
            # A trial promoted past the round's last decision trained the final rung.
            reached = {"rung": int(row.rung) + 1 if bool(row.promoted) else int(row.rung)}
            if not bool(row.promoted) and (metrics[row.trial_id].get("status") or "ok") == "ok":
                reached["status"] = STOPPED
            metrics[row.trial_id] = {**metrics[row.trial_id], **reached}
    for path in evaluation_paths:
        # Beside the record it scored: the trial's metrics.json, or its rung's where it stopped.
        trial = trial_of_folder[Path(path).parent]
        metrics[trial] = {**metrics[trial], **evaluation_columns(path, objectives or {})}
    previous = ledger.read_table(previous_path) if previous_path else None
    history = ledger.build_history(previous, proposals, metrics)
    ledger.write_table(history, output)
    return history


def rung_candidates(proposals_path: str | Path, previous_path: str | Path | None) -> list[str]:
    """The trials that train to a rung: every proposal for rung 0, else those the previous
    rung promoted (read from its promoted.tsv), in proposal order."""
    if not previous_path:
        return [str(t) for t in ledger.read_table(proposals_path)["trial_id"]]
    previous = ledger.read_table(previous_path)
    latest = previous["rung"] == previous["rung"].max()
    return [str(t) for t in previous.loc[latest & previous["promoted"].astype(bool), "trial_id"]]


def promote_rung(
    study: Study,
    arm_name: str,
    rung: int,
    proposals_path: str | Path,
    previous_path: str | Path | None,
    metrics_paths: Iterable[str | Path],
    output: str | Path,
    evaluation_paths: Iterable[str | Path] = (),
) -> pd.DataFrame:
    """After rung ``rung`` of a round: which of its trials go on to the next rung.

    Writes one row per trial of the round at the highest rung it reached so far (trials that
    stopped earlier are copied from ``previous_path``): trial_id, rung, step, status, the
    objectives as measured there, front, crowding and promoted (see ``early_stopping.promotion``).
    A study with lm-eval objectives scores each rung's adapters first (``evaluation_paths``,
    beside the rung's metrics): promotion judges every objective, not only the losses.
    """
    schedule = study.arm(arm_name).early_stopping
    step = study.rung_steps(arm_name)[rung]
    candidates = rung_candidates(proposals_path, previous_path)
    records, trial_of_folder = {}, {}
    for path in metrics_paths:
        record = ledger.read_metrics(path)
        trial = record.get("trial_id") or Path(path).parent.parent.name
        records[trial], trial_of_folder[Path(path).parent] = record, trial
    for path in evaluation_paths:
        trial = trial_of_folder[Path(path).parent]
        records[trial] = {**records[trial], **evaluation_columns(path, study.objectives)}
    missing = [t for t in candidates if t not in records]
    if missing:
        raise ValueError(f"rung {rung} of {arm_name}: no metrics for trial(s) {missing}")
    results = rung_results({t: records[t] for t in candidates}, study.objectives, rung, step)
    decided = promotion(results, study.objectives, schedule.n_keep(len(candidates)), schedule.promote)
    if previous_path:
        earlier = ledger.read_table(previous_path)
        earlier = earlier[~earlier["trial_id"].astype(str).isin(candidates)]
        decided = pd.concat([earlier, decided], ignore_index=True)
    order = {t: i for i, t in enumerate(ledger.read_table(proposals_path)["trial_id"].astype(str))}
    decided = decided.sort_values("trial_id", key=lambda ids: ids.astype(str).map(order), kind="stable")
    ledger.write_table(decided, output)
    promoted = decided.loc[(decided["rung"] == rung) & decided["promoted"].astype(bool), "trial_id"]
    log.info(
        "%s rung %d (step %d): %d of %d trials go on: %s",
        arm_name,
        rung,
        step,
        len(promoted),
        len(candidates),
        ", ".join(map(str, promoted)),
    )
    return decided


def aggregate(
    study: Study,
    history_paths: Iterable[str | Path],
    trials_output: str | Path,
    hypervolume_output: str | Path,
    pareto_output: str | Path,
    curves_output: str | Path | None = None,
) -> pd.DataFrame:
    """The tidy table of every trial, the hypervolume curves and the Pareto set of the study;
    with ``curves_output``, also curves.tsv (``trial_curves``)."""
    from loratune.pareto import distinct_trials, hypervolume_curves, pareto_front

    trials = ledger.collect_trials(ledger.read_table(p) for p in history_paths)
    ledger.write_table(trials, trials_output)
    ledger.write_table(hypervolume_curves(trials, study.objectives), hypervolume_output)
    # One front per seed (each seed is a repeat of the whole study), all arms together; stopped
    # trials count at the values of the highest rung they reached (pareto.RESULT_STATUSES).
    fronts = [pareto_front(distinct_trials(trials[trials.seed == seed]), study.objectives) for seed in study.seeds]
    ledger.write_table(pd.concat(fronts, ignore_index=True), pareto_output)
    if curves_output is not None:
        ledger.write_table(trial_curves(trials, results_dir(history_paths)), curves_output)
    return trials


def results_dir(history_paths: Iterable[str | Path]) -> Path:
    """The study's results folder, from its histories (<results>/seed<s>/<arm>/round<r>/history.tsv)."""
    return Path(next(iter(history_paths))).parents[3]


def trial_metrics_path(results: Path, seed: Any, trial_id: str) -> Path | None:
    """The metrics.json of a trial's furthest training: the full budget's, else its highest rung's
    (a stopped trial); None when the trial left none."""
    trial = results / f"seed{seed}" / "trials" / str(trial_id)
    if (trial / "metrics.json").is_file():
        return trial / "metrics.json"
    rungs = sorted(trial.glob("step*/metrics.json"), key=lambda p: int(p.parent.name[len("step") :]))
    return rungs[-1] if rungs else None


def trial_curves(trials: pd.DataFrame, results: Path) -> pd.DataFrame:
    """Every trial's learning curve (metrics.json "curve") as one tidy table, each trial once
    per seed: the rows of ``report.CURVE_COLUMNS``. Trials without a curve add no row."""
    from loratune.report import CURVE_COLUMNS, curve_rows

    rows = []
    for seed, trial_id in trials.drop_duplicates(["seed", "trial_id"])[["seed", "trial_id"]].itertuples(index=False):
        path = trial_metrics_path(results, seed, trial_id)
        if path is not None:
            rows += curve_rows(seed, trial_id, ledger.read_metrics(path))
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def importance(study: Study, trials_path: str | Path, output: str | Path) -> pd.DataFrame:
    """importance.tsv: per objective, the fANOVA importance of every tuned parameter."""
    from loratune.importance import importance_table

    table = importance_table(ledger.read_table(trials_path), study.space, study.objectives)
    ledger.write_table(table, output)
    return table


def export_gptune_db(study: Study, history_path: str | Path, output: str | Path, arm: str, seed: int) -> dict:
    history = ledger.read_table(history_path)
    database = ledger.to_gptune_db(history, study.space, study.objectives, f"{study.name}-{arm}-seed{seed}")
    files.atomic_write_json(output, database)
    return database


def plot_pareto(study: Study, trials_path: str | Path, output: str | Path) -> None:
    from loratune import plots

    trials = ledger.read_table(trials_path)
    plots.write_html(plots.pareto_figure(trials, study.objectives, study.space), output)


def plot_hypervolume(curves_path: str | Path, output: str | Path) -> None:
    from loratune import plots

    plots.write_html(plots.hypervolume_figure(ledger.read_table(curves_path)), output)


def plot_pareto_set(study: Study, trials_path: str | Path, output: str | Path) -> None:
    from loratune import plots

    trials = ledger.read_table(trials_path)
    plots.write_html(plots.pareto_set_figure(trials, study.objectives, study.space), output)


def summary_text(study: Study, front: pd.DataFrame, report_path: str | Path) -> str:
    """The Pareto set as printed at the end of a run; with early stopping, a trial's status and
    steps say whether it is on the set at a rung (``stopped``, fewer steps than the budget)."""
    extra = ["status", "steps"] if (front.get("status", pd.Series(dtype=object)) == STOPPED).any() else []
    columns = [c for c in ["seed", "arm", "trial_id", *extra, *study.objectives] if c in front.columns]
    table = front[columns].to_string(index=False) if len(front) else "(no successful trial)"
    directions = ", ".join(f"{name} ({sense})" for name, sense in study.objectives.items())
    return (
        f"Pareto set of study {study.name!r} over {directions}:\n{table}\n" f"Report: {Path(report_path).resolve()}\n"
    )


def study_facts(study: Study, counts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What a reader asks first about a study, as (label, value) lines for the report's top."""
    from loratune.report import space_summary

    config = study.config
    if config["backend"] == "benchmark":
        bench = config["benchmark"]
        model = f"benchmark {bench['problem']}" + (f" ({bench['path']})" if bench.get("path") else "")
        dataset = "(none: the benchmark answers every trial)"
    else:
        model, dataset = config["model"]["name"], config["dataset"]["path"]
    arms = []
    for arm in study.arms:
        detail = f"{arm.name}: {arm.proposer}, {arm.rounds} rounds x {arm.batch_size}"
        if arm.early_stopping is not None:
            detail += f", early stopping at steps {study.rung_steps(arm.name)}"
        arms.append(detail)
    minutes = counts["train_seconds"] / 60
    return [
        ("study", study.name),
        ("model", model),
        ("dataset", dataset),
        (
            "objectives",
            ", ".join(f"{n} ({'minimized' if s == 'min' else 'maximized'})" for n, s in study.objectives.items()),
        ),
        ("search space", space_summary(study.space)),
        ("pilot", f"{config['pilot']['n']} trials ({config['pilot']['design']}) per seed"),
        ("arms", "; ".join(arms)),
        ("seeds", ", ".join(map(str, study.seeds))),
        (
            "trials",
            f"{counts['trials']} ran: {counts['ok']} ok, {counts['stopped']} stopped early, "
            f"{counts['failed']} failed",
        ),
        (
            "training time",
            (
                f"{counts['train_seconds']:.0f} s ({minutes:.1f} min) over all trials"
                if math.isfinite(counts["train_seconds"])
                else "not recorded"
            ),
        ),
    ]


def write_report(
    study: Study,
    trials_path: str | Path,
    curves_path: str | Path,
    pareto_path: str | Path,
    output: str | Path,
    importance_path: str | Path | None = None,
    learning_curves_path: str | Path | None = None,
) -> str:
    """The study's one-page HTML report, and summary.txt beside it (printed at the end of a run).

    Computed from the aggregated tables only (trials, hypervolume, Pareto set, importance,
    learning curves), so re-plotting retrains nothing. A recommended trial's adapter path is
    given where its folder holds one (``training.keep_adapter``)."""
    from loratune import plots, report

    trials = ledger.read_table(trials_path)
    curves = ledger.read_table(curves_path)
    front = ledger.read_table(pareto_path)
    objectives, space = study.objectives, study.space
    results = Path(output).parent
    recommended = report.recommended_trials(trials, objectives)
    adapters = [
        results / f"seed{seed}" / "trials" / str(trial) / "adapter"
        for seed, trial in zip(recommended["seed"], recommended["trial_id"])
    ]
    recommended["adapter"] = [str(path) if path.is_dir() else "" for path in adapters]
    intro = plots.summary_html(study_facts(study, report.trial_counts(trials)), recommended, objectives, space)
    loss = report.first_loss_objective(objectives)
    sections = [
        ("Pareto fronts", plots.pareto_figure(trials, objectives, space)),
        ("Hypervolume against trials", plots.hypervolume_figure(curves)),
    ]
    if "train_seconds" in curves.columns:
        sections.append(
            (
                "Hypervolume against training time",
                plots.hypervolume_cost_figure(report.hypervolume_cost_curves(curves, "train_seconds"), "train_seconds"),
            )
        )
    sections += [
        (
            "Each objective against each parameter",
            plots.slice_figure(report.slice_data(trials, objectives, space), objectives, space),
        ),
        (
            f"{loss} over learning rate and alpha / rank",
            plots.contour_figure(report.contour_data(trials, loss, space), loss),
        ),
    ]
    if importance_path is not None:
        sections.append(("Hyperparameter importance", plots.importance_figure(ledger.read_table(importance_path))))
    if learning_curves_path is not None:
        sections.append(
            (
                "Learning curves",
                plots.learning_curves_figure(
                    report.learning_curve_data(ledger.read_table(learning_curves_path), trials, objectives)
                ),
            )
        )
    sections += [
        ("Trials per device over time", plots.timeline_figure(report.timeline_data(trials))),
        ("Pareto set of each arm", plots.pareto_set_figure(trials, objectives, space)),
    ]
    html = plots.report_html(f"loratune study {study.name}", sections, intro=intro)
    files.atomic_write_text(output, html)
    summary = summary_text(study, front, output)
    files.atomic_write_text(Path(output).parent / "summary.txt", summary)
    return summary

"""What a study's folder says about itself, checked when a run starts, so its files never lie.

A Snakemake rerun judges files by their modification times only: it says "Nothing to be done"
over results computed with another config, over a lost ``metrics.json`` (an intermediate whose
dependents are newer) and over a failed trial. ``prepare_run`` closes those gaps before the DAG
is built:

- the resolved config of the first run is kept as ``config.resolved.yaml``; a rerun with a
  config that changes results is refused with a field-by-field difference, unless the user opts
  in (``recompute``), in which case exactly the files the change invalidates move aside;
- a change under ``evaluation`` re-evaluates every trial without being asked: the
  evaluation.json files and the tables built from them move aside, no trial retrains;
- a missing or unreadable metrics.json (a rung's ``step<k>/metrics.json`` too), promoted.tsv,
  evaluation.json or history.tsv is found, and it and the files built from it move aside, so
  Snakemake rebuilds exactly that chain (a metrics.json is restored from the trial's kept
  ``finished.json`` when intact, else only that trial retrains; an evaluation re-scores);
- ``retry`` moves the records of failed trials and failed evaluations (all, or those failed for
  given reasons) aside with the same chain and their kept copies, so exactly those run again.

Nothing is deleted: whatever moves aside goes to ``superseded/<time>/`` under the study folder,
at the same relative path.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from loratune import files, ledger
from loratune.ledger import PILOT
from loratune.config import Study
from loratune.trial import finished_record_path, kept_record, record_key

__all__ = [
    "RESOLVED_CONFIG",
    "SUPERSEDED",
    "HEAD_LOCK",
    "HARMLESS_FIELDS",
    "TRIAL_FIELDS",
    "EVALUATION_FIELDS",
    "trial_settings",
    "StudyStateError",
    "config_differences",
    "change_scope",
    "find_damage",
    "select_failed",
    "prepare_run",
    "only_looks",
    "hold_lock",
]

RESOLVED_CONFIG = "config.resolved.yaml"
SUPERSEDED = "superseded"
# Held by the Snakemake head that runs the study, for the whole run (see ``hold_lock``).
HEAD_LOCK = "head.lock"
# Snakemake invocations that only look: they must not change the study folder or take its lock.
_LOOKING_FLAGS = {
    "--dry-run",
    "--dryrun",
    "--summary",
    "-S",
    "--detailed-summary",
    "-D",
    "--lint",
    "--list",
    "-l",
    "--list-target-rules",
    "--dag",
    "--rulegraph",
    "--filegraph",
    "--unlock",
    "--report",
    "--list-changes",
    "--lc",
    "--list-untracked",
    "--lu",
}
# The one list of which config fields can change results (``change_scope`` reads it). A field
# under HARMLESS_FIELDS cannot (where files go, what a job may use); one under TRIAL_FIELDS
# changes every trial's result; seeds, objectives, pilot and arms change what the search
# computed from the trials; any other field (one added later) counts as changing every trial.
HARMLESS_FIELDS = ("resources", "results_dir")
TRIAL_FIELDS = ("backend", "benchmark", "model", "dataset", "training", "search_space")
# Fields that change only what lm-eval scores of each trained adapter: a change re-evaluates
# every trial (the old evaluation.json move aside) and retrains nothing, without being asked.
EVALUATION_FIELDS = ("evaluation",)
# The study's tables, built from every history: rebuilt after any result-relevant change.
STUDY_TABLES = (
    "trials.tsv",
    "hypervolume.tsv",
    "pareto_set.tsv",
    "plots",
    "report.html",
    "summary.txt",
    "gptune_db",
)


class StudyStateError(RuntimeError):
    """The study folder disagrees with the config; the message says what differs and the ways out."""


# ---- the resolved config and its differences -------------------------------------------
def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of every leaf of a nested mapping (lists are leaves)."""
    if isinstance(value, Mapping) and value:
        out = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)


_ABSENT = object()


def config_differences(old: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
    """(field, old, new) of every leaf that differs, in a stable order; a missing side is ``_ABSENT``."""
    before, after = _leaves(old), _leaves(new)
    fields = sorted(set(before) | set(after))
    return [
        (name, before.get(name, _ABSENT), after.get(name, _ABSENT))
        for name in fields
        if _comparable(before.get(name, _ABSENT)) != _comparable(after.get(name, _ABSENT))
    ]


def _comparable(value: Any) -> Any:
    """An empty list or mapping equals an absent field: a field added later with an empty
    default (``warm_start: []``) changes nothing in a study recorded before it."""
    return _ABSENT if value in ([], {}) else value


def change_scope(field_name: str, backend: str) -> str:
    """What a change of ``field_name`` invalidates: ``harmless``, ``trials`` (every trial),
    ``pilot`` (the pilot and every arm), ``arm:<name>`` (``arms.<name>.early_stopping`` too: the
    arm's rounds and their promotions), ``arms`` (every arm), ``evaluations`` or ``tables``."""
    top, _, rest = field_name.partition(".")
    if top in HARMLESS_FIELDS:
        return "harmless"
    if top in EVALUATION_FIELDS:
        return "evaluations"
    if top in TRIAL_FIELDS:
        return "trials"
    if top == "objectives":
        # A benchmark trial computes only the objectives it is asked for; a real one records all.
        return "trials" if backend == "benchmark" else "arms"
    if top in (PILOT, "warm_start"):  # warm-start observations are part of the pilot
        return PILOT
    if top == "arms" and rest:
        return f"arm:{rest.split('.')[0]}"
    if top == "seeds":
        return "tables"
    return "trials"


def trial_settings(config: Mapping) -> dict:
    """The config fields whose change changes a trial's result: what a kept trial record must
    have been computed with (``loratune.trial``)."""
    return {name: value for name, value in config.items() if change_scope(name, config["backend"]) == "trials"}


def _invalidated(out: Path, scopes: set[str]) -> list[Path]:
    """The files and folders of the study that the changes of ``scopes`` invalidate."""
    if "trials" in scopes:
        return sorted(p for p in out.iterdir() if p.name not in (SUPERSEDED, RESOLVED_CONFIG, HEAD_LOCK))
    paths = [out / name for name in STUDY_TABLES]
    if "evaluations" in scopes:
        paths += list(out.glob("seed*/trials/*/evaluation.json")) + list(
            out.glob("seed*/trials/*/step*/evaluation.json")
        )
        paths += list(out.glob("seed*/*/round*/history.tsv"))
    for seed_dir in out.glob("seed*"):
        for folder in seed_dir.iterdir():
            if folder.name == "trials" or not folder.is_dir():
                continue
            is_pilot = folder.name == PILOT
            if PILOT in scopes or ("arms" in scopes and not is_pilot) or f"arm:{folder.name}" in scopes:
                paths.append(folder)
    return sorted(p for p in paths if p.exists())


def _move_aside(out: Path, paths: Iterable[Path], stamp: str) -> list[Path]:
    """Move ``paths`` (inside ``out``) to ``out/superseded/<stamp>/`` at the same relative path."""
    moved = []
    for path in paths:
        if not path.exists():
            continue
        target = out / SUPERSEDED / stamp / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
        moved.append(path)
    return moved


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _resolved(config: Mapping) -> dict:
    # A plain copy: what validate_config filled in, without the run's own switches.
    return json.loads(json.dumps(config, default=str))


def _refusal(study: Study, lines: list[str], out: Path) -> str:
    return (
        f"study {study.name!r} in {out} was computed with another config; changed field(s):\n"
        + "\n".join(f"  {line}" for line in lines)
        + f"\nEither give the study a new name (study: ...), or rerun with --config recompute=true to move "
        f"what the change invalidates into {out / SUPERSEDED}/ and compute it again."
    )


# ---- damaged files ---------------------------------------------------------------------
@dataclass
class _Round:
    seed: int
    arm: str
    round: int
    folder: Path
    trial_ids: list[str] = field(default_factory=list)
    rung_steps: list[int] = field(default_factory=list)  # early stopping: each rung's step, the last the budget

    @property
    def proposals(self) -> Path:
        return self.folder / "proposals.tsv"

    @property
    def history(self) -> Path:
        return self.folder / "history.tsv"

    def promoted(self, rung: int) -> Path:
        return self.folder / f"rung{rung}" / "promoted.tsv"


def _rounds(study: Study, out: Path) -> list[_Round]:
    """Every round of the study whose proposals exist, in loop order (pilot first)."""
    rounds = []
    for seed in study.seeds:
        plan = [(PILOT, 0)] + [(arm.name, r) for arm in study.arms for r in range(1, arm.rounds + 1)]
        for arm, number in plan:
            entry = _Round(seed, arm, number, out / f"seed{seed}" / arm / f"round{number}")
            schedule = None if arm == PILOT else study.arm(arm).early_stopping
            if schedule is not None and len(schedule.rungs) > 1:
                entry.rung_steps = study.rung_steps(arm)
            if entry.proposals.is_file():
                with entry.proposals.open(newline="") as handle:
                    entry.trial_ids = [row["trial_id"] for row in csv.DictReader(handle, delimiter="\t")]
            rounds.append(entry)
    return rounds


def _metrics_path(out: Path, seed: int, trial_id: str, step: int | None = None) -> Path:
    trial = out / f"seed{seed}" / "trials" / trial_id
    return (trial if step is None else trial / f"step{step}") / "metrics.json"


def _record_problem(path: Path, trial_id: str | None = None) -> str | None:
    """Why a metrics.json or evaluation.json cannot be used (missing, unreadable, another
    trial's, unfinished), or None."""
    if not path.exists():
        return "missing"
    try:
        record = ledger.read_metrics(path)
    except (OSError, ValueError) as error:
        return str(error).removeprefix(f"{path}: ")
    if record.get("trial_id", trial_id) != trial_id or "status" not in record:
        return "not a finished trial record"
    return None


def _promoted_problem(path: Path, trial_ids: list[str]) -> str | None:
    """Why a rung's promoted.tsv cannot be used (missing, unreadable, not the round's trials), or None."""
    if not path.exists():
        return "missing"
    try:
        table = ledger.read_table(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"unreadable ({error})"
    if not {"trial_id", "rung", "step", "promoted"} <= set(table.columns):
        return "not a promotion table (no trial_id, rung, step and promoted columns)"
    if sorted(map(str, table["trial_id"])) != sorted(dict.fromkeys(trial_ids)) or table["promoted"].isna().any():
        return "incomplete (rows of its round are missing)"
    return None


def _history_problem(entry: _Round, expected_rows: int | None) -> str | None:
    """Why a history.tsv cannot be used (unreadable, truncated), or None when it is complete."""
    try:
        with entry.history.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as error:
        return f"unreadable ({error})"
    if not rows or "trial_id" not in rows[0] or "status" not in rows[0]:
        return "not a history table (no trial_id and status columns)"
    header, body = rows[0], rows[1:]
    if any(len(row) != len(header) for row in body):
        return "truncated (a row lacks cells)"
    listed = {row[header.index("trial_id")] for row in body}
    if not set(entry.trial_ids) <= listed or (expected_rows is not None and len(body) != expected_rows):
        return "incomplete (rows of its round are missing)"
    return None


def _downstream(study: Study, out: Path, entry: _Round, rounds: list[_Round]) -> list[Path]:
    """Histories built from ``entry``'s round on, then the study tables: what must go so that
    Snakemake rebuilds the round (it does not rebuild a missing file whose dependents exist)."""
    same_seed = [r for r in rounds if r.seed == entry.seed]
    if entry.arm == PILOT:
        chain = same_seed
    else:
        chain = [r for r in same_seed if r.arm == entry.arm and r.round >= entry.round]
    return [r.history for r in chain] + [out / name for name in STUDY_TABLES]


def _round_records(out: Path, entry: _Round) -> list[tuple[Path, str, list[Path], bool]]:
    """(record, trial id, the round's files built from it, whether it is damaged) of every
    metrics.json the round reads, rung by rung for early stopping, with each promoted.tsv as a
    record of its own; a rung whose promotion is unreadable hides the rungs after it."""
    records = []
    candidates = list(dict.fromkeys(entry.trial_ids))
    steps = entry.rung_steps or [None]
    for rung, step in enumerate(steps):
        last = rung == len(steps) - 1
        promotions = [entry.promoted(k) for k in range(rung, len(steps) - 1)]
        for trial_id in candidates:
            path = _metrics_path(out, entry.seed, trial_id, None if last else step)
            records.append((path, trial_id, promotions, _record_problem(path, trial_id) is not None))
        if last:
            break
        promoted = entry.promoted(rung)
        problem = _promoted_problem(promoted, entry.trial_ids)
        records.append((promoted, "", promotions[1:], problem is not None))
        if problem:
            break
        table = ledger.read_table(promoted)
        latest = table["rung"] == table["rung"].max()
        candidates = [str(t) for t in table.loc[latest & table["promoted"].astype(bool), "trial_id"]]
    return records


def _problem(path: Path, trial_id: str, entry: _Round) -> str | None:
    if path.name == "promoted.tsv":
        return _promoted_problem(path, entry.trial_ids)
    return _record_problem(path, trial_id)


def _evaluation_paths(out: Path, entry: _Round) -> list[tuple[Path, str]]:
    """evaluation.json beside each record the round's history reads: a trial's full-budget
    metrics.json, or its rung's where early stopping stopped it."""
    paths = [
        (path.with_name("evaluation.json"), trial_id)
        for path, trial_id, _, _ in _round_records(out, entry)
        if path.name == "metrics.json" and path.parent.name == trial_id
    ]
    for rung, step in enumerate((entry.rung_steps or [None])[:-1]):
        promoted = entry.promoted(rung)
        if _promoted_problem(promoted, entry.trial_ids):
            break
        table = ledger.read_table(promoted)
        stopped = table.loc[(table["rung"] == rung) & ~table["promoted"].astype(bool), "trial_id"]
        paths += [(_metrics_path(out, entry.seed, str(t), step).with_name("evaluation.json"), str(t)) for t in stopped]
    return paths


def find_damage(study: Study, out: str | Path) -> list[tuple[Path, str, list[Path]]]:
    """(file, problem, files built from it) for every missing or unreadable metrics.json (a
    rung's too), promoted.tsv, evaluation.json or history.tsv of a round that the study's later
    files claim is complete."""
    out = Path(out)
    rounds = _rounds(study, out)
    damage = []
    previous_rows: dict[tuple[int, str], int] = {}
    for entry in rounds:
        if not entry.proposals.is_file():
            continue
        downstream = _downstream(study, out, entry, rounds)
        built_after_round = [p for p in downstream if p.exists()]
        for path, trial_id, in_round, damaged in _round_records(out, entry):
            if not damaged:
                continue
            built = [p for p in in_round if p.exists()] + built_after_round
            problem = _problem(path, trial_id, entry)
            # A missing file of a round nothing was built from yet is simply pending.
            if problem != "missing" or built:
                damage.append((path, problem, built))
        if study.evaluates:
            for path, trial_id in _evaluation_paths(out, entry):
                problem = _record_problem(path, trial_id)
                if problem and (problem != "missing" or built_after_round):
                    damage.append((path, problem, built_after_round))
        base = 0 if entry.arm == PILOT else previous_rows.get((entry.seed, entry.arm if entry.round > 1 else PILOT))
        expected = None if base is None else base + len(entry.trial_ids)
        if entry.history.exists():
            problem = _history_problem(entry, expected)
            if problem:
                damage.append((entry.history, problem, built_after_round))
        elif [p for p in built_after_round if p != entry.history]:
            damage.append((entry.history, "missing", built_after_round))
        if expected is not None:
            previous_rows[(entry.seed, entry.arm)] = expected
    return damage


# ---- failed trials ---------------------------------------------------------------------
def failure_reason(record: Mapping) -> str:
    """The exception name a failed trial recorded (``TimeLimitReached``, ``OutOfMemoryError``...)."""
    return str(record.get("error") or "unknown").split(":")[0].strip() or "unknown"


def select_failed(study: Study, out: str | Path, reasons: Iterable[str] | None) -> list[tuple[Path, str, list[Path]]]:
    """(record, reason, files built from it) of each recorded failed trial (a rung's
    metrics.json too) and each failed evaluation.json of a trained trial, whose reason is in
    ``reasons`` (None: every failure). The companions of a metrics.json (its kept record, its
    evaluation) count among the files built from it."""
    out = Path(out)
    wanted = None if reasons is None else set(reasons)
    rounds = _rounds(study, out)
    chosen: dict[Path, tuple[str, list[Path]]] = {}

    def consider(path: Path, trial_id: str, built: list[Path]) -> None:
        if _record_problem(path, trial_id):
            return
        record = ledger.read_metrics(path)
        reason = failure_reason(record)
        if record.get("status") != "failed" or (wanted is not None and reason not in wanted):
            return
        _, dependents = chosen.get(path, (reason, []))
        chosen[path] = (reason, dependents + built)

    for entry in rounds:
        downstream = _downstream(study, out, entry, rounds)
        for path, trial_id, in_round, _ in _round_records(out, entry):
            if path.name != "metrics.json":
                continue
            companions = [finished_record_path(path)] + ([path.with_name("evaluation.json")] * study.evaluates)
            consider(path, trial_id, companions + in_round + downstream)
        if study.evaluates:
            for path, trial_id in _evaluation_paths(out, entry):
                metrics = path.with_name("metrics.json")
                # A failed trial's evaluation goes with its trial; a trained adapter's is retried alone.
                trained = not _record_problem(metrics, trial_id) and ledger.read_metrics(metrics).get("status") == "ok"
                if trained and metrics not in chosen:
                    consider(path, trial_id, downstream)
    return [(path, reason, sorted(set(dependents))) for path, (reason, dependents) in chosen.items()]


def _retry_reasons(value: Any) -> list[str] | None:
    """``retry_failed`` as given on the command line: true/all, or reasons separated by commas."""
    if value is True or str(value).strip().lower() in ("true", "all", "yes", "1"):
        return None
    return [part.strip() for part in str(value).split(",") if part.strip()]


# ---- the run's start ---------------------------------------------------------------------
def _repair(study: Study, path: Path) -> str:
    """What the run does about a damaged file (moved aside with what is built from it)."""
    if path.name == "evaluation.json":
        return "re-evaluating that trial (retraining nothing)"
    if path.name != "metrics.json":
        return "rebuilding it"
    trial_dir = path.parent.parent if path.parent.name.startswith("step") else path.parent
    step = int(path.parent.name[4:]) if trial_dir != path.parent else None
    key = record_key(study, trial_dir.name, int(trial_dir.parent.parent.name[4:]), step)
    if kept_record(path, key) is not None:
        return f"restoring it from {finished_record_path(path)} (no training)"
    return "retraining that trial"


def prepare_run(
    study: Study,
    out: str | Path,
    *,
    recompute: bool = False,
    retry_failed: Any = None,
    dry_run: bool = False,
) -> list[str]:
    """Reconcile the study folder with ``study`` before any job; returns the lines to print.

    Raises ``StudyStateError`` when the config changes results and ``recompute`` is not set.
    A dry run changes nothing on disk and reports what a real run would do.
    """
    out = Path(out)
    messages: list[str] = []
    stamp = _stamp()
    resolved = _resolved(study.config)
    stored_path = out / RESOLVED_CONFIG
    if stored_path.is_file():
        stored = yaml.safe_load(stored_path.read_text(encoding="utf-8")) or {}
        differences = config_differences(stored, resolved)
        scoped = [(f, a, b, change_scope(f, resolved["backend"])) for f, a, b in differences]
        relevant = [(f, a, b) for f, a, b, scope in scoped if scope not in ("harmless", "evaluations")]
        verb = "would move" if dry_run else "moved"
        if relevant:
            lines = [f"{name}: {_show(old)} -> {_show(new)}" for name, old, new in relevant]
            if not recompute:
                raise StudyStateError(_refusal(study, lines, out))
            scopes = {change_scope(f, resolved["backend"]) for f, _, _ in relevant}
            invalid = _invalidated(out, scopes)
            if not dry_run:
                _move_aside(out, invalid, stamp)
            messages.append(
                f"recompute: {verb} {len(invalid)} invalidated path(s) to {out / SUPERSEDED / stamp}/ "
                f"after the change of {', '.join(f for f, _, _ in relevant)}"
            )
        evaluation_changes = [f for f, _, _, scope in scoped if scope == "evaluations"]
        if evaluation_changes and study.evaluates:
            invalid = _invalidated(out, {"evaluations"})
            if not dry_run:
                _move_aside(out, invalid, stamp)
            messages.append(
                f"re-evaluating every trial (retraining none) after the change of {', '.join(evaluation_changes)}: "
                f"{verb} {len(invalid)} evaluation file(s) and the tables built from them to {out / SUPERSEDED / stamp}/"
            )
    elif out.exists() and any(out.glob("seed*/*/round*/proposals.tsv")):
        messages.append(f"note: {out} has results but no {RESOLVED_CONFIG} (an older loratune); recording this config")

    for path, problem, built in find_damage(study, out):
        what = _repair(study, path)
        messages.append(f"{path}: {problem}; {what}, then what is built from it")
        if not dry_run:
            _move_aside(out, [path, *built] if path.exists() else built, stamp)

    if retry_failed not in (None, False, "", "false", "False"):
        reasons = _retry_reasons(retry_failed)
        chosen = select_failed(study, out, reasons)
        label = "every reason" if reasons is None else ", ".join(reasons)
        if not chosen:
            messages.append(f"retry_failed ({label}): no recorded failed trial matches")
        for path, reason, built in chosen:
            what = "re-evaluating" if path.name == "evaluation.json" else "retraining"
            messages.append(f"retry_failed: {what} {path.parent} ({reason})")
            if not dry_run:
                _move_aside(out, [path, *built], stamp)

    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(stored_path, yaml.safe_dump(resolved, sort_keys=False))
    return messages


def only_looks(argv: Iterable[str]) -> bool:
    """Whether a Snakemake command line only looks at the study (a dry run, a summary, --unlock...)."""
    for arg in argv:
        name = arg.split("=")[0]
        if name in _LOOKING_FLAGS or name.startswith("--list-"):
            return True
        # Combined short flags without values, as in -np.
        if name.startswith("-") and not name.startswith("--") and name[1:].isalpha() and "n" in name[1:]:
            return True
    return False


# ---- locks ---------------------------------------------------------------------------------
def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def hold_lock(path: str | Path, *, wait: bool) -> Any:
    """Take an exclusive POSIX lock on ``path`` (fcntl, so it also holds across NFS clients) and
    record the owner in it; returns the open file, which keeps the lock until it is closed or
    the process ends (a killed process releases it). With ``wait`` False a held lock raises
    ``BlockingIOError`` whose message names the owner."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise BlockingIOError(f"{path} is held by {owner}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_owner()) + "\n")
    handle.flush()
    return handle

"""The history ledger: proposals, trial metrics and histories as tables, GPTune's JSON history.

Tables are tab-separated text with a header. Only an empty cell is missing (``NA`` or ``None``
stay strings), and floats are written with Python's shortest round-trip repr, so a parameter
read back has exactly the value and kind it was written with: rank 16 stays the integer 16,
a learning rate of 0.000316 stays that float.

Every table is written atomically (``loratune.files``): a job killed mid-write leaves the
previous version or the new one, never half a table.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from loratune import __version__
from loratune.files import atomic_write_text, jsonable
from loratune.space import SearchSpace

__all__ = [
    "ID_COLUMNS",
    "PILOT",
    "STOPPED",
    "RESULT_STATUSES",
    "write_table",
    "read_table",
    "proposed_trial_ids",
    "require_columns",
    "read_metrics",
    "build_history",
    "collect_trials",
    "to_gptune_db",
    "from_gptune_db",
]

# The columns that say which trial a row is and where it came from, in table order.
ID_COLUMNS = ("seed", "arm", "round", "trial_id")
# The arm name of every seed's shared pilot (round 0); no configured arm may take it.
PILOT = "pilot"
# The status of a trial that early stopping stopped at a rung before its full budget.
STOPPED = "stopped"
# The statuses of a trial that is a result: its objective values are those of an adapter that
# was kept (a stopped trial's at the highest rung it reached: training.select applies, and the
# LR schedule spans the full budget, so it is the exact prefix of its full run). Fronts,
# hypervolumes and the Pareto set count these; "failed" is no result.
RESULT_STATUSES = ("ok", STOPPED)
# GPTune files every evaluation under a task; our studies tune one task, so every evaluation
# carries the same one-point task parameter.
GPTUNE_TASK = {"task": 0.0}
# Evaluations get uids derived from where the trial lives (seed<s>/trials/<trial_id>), so an
# export is reproducible and a trial shared by two arms has one uid in both databases.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "loratune:trial")


# ---- tables and metrics -----------------------------------------------------------------
def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` as a TSV table with a header, atomically."""
    text = df.to_csv(sep="\t", index=False, na_rep="", lineterminator="\n")
    atomic_write_text(path, text)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TSV table written by ``write_table``."""
    try:
        return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: table not found") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file, expected a table with a header line") from None
    except pd.errors.ParserError as bad:
        raise ValueError(f"{path}: not a valid TSV table ({str(bad).strip()})") from None


def proposed_trial_ids(path: str | os.PathLike) -> list[str]:
    """The trial ids of a proposals table, in order; plain ``csv``, as cheap as a Snakemake
    input function must be."""
    with open(path, newline="") as handle:
        return [row["trial_id"] for row in csv.DictReader(handle, delimiter="\t")]


def read_metrics(path: str | os.PathLike) -> dict:
    """A trial's ``metrics.json`` as a dict."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: trial metrics not found") from None
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as bad:
        raise ValueError(f"{path}: not valid JSON (line {bad.lineno}, column {bad.colno}: {bad.msg})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    return metrics


# ---- histories -------------------------------------------------------------------------
def _order_columns(columns: Iterable[str], params: Iterable[str]) -> list[str]:
    """seed, arm, round, trial_id, the parameters, status, then everything else sorted."""
    columns = list(dict.fromkeys(columns))
    head = [c for c in (*ID_COLUMNS, *params, "status") if c in columns]
    return head + sorted(c for c in columns if c not in head)


def _param_columns(table: pd.DataFrame) -> list[str]:
    """The parameter columns of a proposals table or a history (see ``_order_columns``)."""
    columns = list(table.columns)
    start = columns.index("trial_id") + 1
    end = columns.index("status") if "status" in columns else len(columns)
    return columns[start:end]


def _settle_types(table: pd.DataFrame) -> pd.DataFrame:
    """Column types as a TSV round trip gives them, so a table equals itself read back.

    An all-missing column (a metric every trial left null) reads back as float NaN, and text
    with gaps as strings; built from records or by concatenation they would stay objects.
    """
    table = table.infer_objects()
    for column in table.columns:
        if table[column].dtype == object and len(table) and table[column].isna().all():
            table[column] = np.nan
    return table


def require_columns(table: pd.DataFrame, required: Iterable[str], what: str) -> None:
    """Raise a one-line error naming ``what`` and the columns it lacks."""
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: lacks column(s) {missing}; it has {list(table.columns)}")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int, float, np.generic))


def _result_columns(trial_id: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar top-level entries of a trial's metrics; nested ones (provenance) stay out."""
    reported = metrics.get("trial_id", trial_id)
    if reported != trial_id:
        raise ValueError(f"metrics of trial {trial_id!r} say they belong to {reported!r}")
    row = {k: v for k, v in metrics.items() if _is_scalar(v) and k not in ID_COLUMNS}
    row["status"] = metrics.get("status") or "ok"
    return row


def build_history(
    previous: pd.DataFrame | None,
    proposals: pd.DataFrame,
    metrics_by_trial: Mapping[str, Mapping[str, Any]],
) -> pd.DataFrame:
    """The previous history followed by this round's proposals joined with their metrics.

    ``proposals`` has the columns seed, arm, round, trial_id and one per parameter; every
    proposed trial needs an entry in ``metrics_by_trial``. A metrics ``status`` that is missing
    means ``ok``.
    """
    require_columns(proposals, ID_COLUMNS, "proposals")
    params = _param_columns(proposals)
    if previous is not None:
        require_columns(previous, (*ID_COLUMNS, "status"), "previous history")
        if _param_columns(previous) != params:
            raise ValueError(f"previous history has parameters {_param_columns(previous)}, " f"proposals have {params}")

    missing = [t for t in proposals["trial_id"] if t not in metrics_by_trial]
    if missing:
        raise ValueError(f"no metrics for proposed trial(s) {missing}")
    new_rows = []
    for proposal in proposals.to_dict("records"):
        results = _result_columns(proposal["trial_id"], metrics_by_trial[proposal["trial_id"]])
        # Metrics may echo the hyperparameters; the proposal's values are the ones searched.
        new_rows.append({**results, **proposal})

    rows = (previous.to_dict("records") if previous is not None else []) + new_rows
    if rows:
        history = _settle_types(pd.DataFrame.from_records(rows))
    else:
        history = pd.DataFrame(columns=[*ID_COLUMNS, *params, "status"])
    if previous is not None:
        for column in previous.columns:
            if column not in history.columns:
                history[column] = previous[column]
    repeated = history.duplicated(["seed", "trial_id"], keep="first")
    if repeated.any():
        raise ValueError(f"trial(s) {list(history.loc[repeated, 'trial_id'])} appear twice in one history")
    return history[_order_columns(history.columns, params)]


def collect_trials(histories: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Every trial of a study once per arm, tidy: the pilot of each seed once (arm ``pilot``),
    then each arm's own rounds, sorted by seed, arm (as first seen) and round.

    Each arm's history starts with its seed's pilot rows (round 0); they are kept once.
    """
    histories = list(histories)
    if not histories:
        raise ValueError("collect_trials: no histories given")
    pilots: dict[Any, pd.DataFrame] = {}
    pilot_source: dict[Any, str] = {}
    parts = []
    params: list[str] = []
    for history in histories:
        require_columns(history, (*ID_COLUMNS, "status"), "history")
        params += [p for p in _param_columns(history) if p not in params]
        is_pilot = history["round"] == 0
        own = history.loc[~is_pilot]
        arm = str(own["arm"].iloc[0]) if len(own) else "an arm without rounds"
        for seed, pilot in history.loc[is_pilot].groupby("seed", sort=False):
            if seed not in pilots:
                pilots[seed], pilot_source[seed] = pilot, arm
            elif set(pilot["trial_id"]) != set(pilots[seed]["trial_id"]):
                raise ValueError(f"seed {seed}: the pilot rows of {arm} differ from those of " f"{pilot_source[seed]}")
        parts.append(own)
    pilot_rows = [p.assign(arm=PILOT) for p in pilots.values()]
    trials = _settle_types(pd.concat([*pilot_rows, *parts], ignore_index=True))

    arm_order = {PILOT: -1}
    for arm in trials["arm"]:
        arm_order.setdefault(arm, len(arm_order))
    # A stable sort keeps each round's trials in the order they were proposed.
    trials = trials.sort_values(
        ["seed", "arm", "round"],
        key=lambda column: column.map(arm_order) if column.name == "arm" else column,
        kind="stable",
    ).reset_index(drop=True)
    return trials[_order_columns(trials.columns, params)]


# ---- GPTune's JSON history database --------------------------------------------------
def _gptune_time(timestamp: Any) -> dict[str, int] | None:
    """GPTune's ``time`` record (a ``time.struct_time`` as a dict), in UTC."""
    if timestamp is None:
        return None
    if isinstance(timestamp, (int, float)):
        moment = datetime.fromtimestamp(float(timestamp), tz=timezone.utc)
    else:
        try:
            moment = datetime.fromisoformat(str(timestamp))
        except ValueError:
            raise ValueError(f"timestamp {timestamp!r}: expected ISO 8601 text or seconds since the epoch") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    fields = moment.astimezone(timezone.utc).timetuple()
    return {
        "tm_year": fields.tm_year,
        "tm_mon": fields.tm_mon,
        "tm_mday": fields.tm_mday,
        "tm_hour": fields.tm_hour,
        "tm_min": fields.tm_min,
        "tm_sec": fields.tm_sec,
        "tm_wday": fields.tm_wday,
        "tm_yday": fields.tm_yday,
        "tm_isdst": 0,
    }


def to_gptune_db(
    history: pd.DataFrame,
    space: SearchSpace,
    objectives: Mapping[str, str],
    problem_name: str,
    machine_name: str = "loratune",
) -> dict:
    """The history in the JSON layout of GPTune 2.0.0's ``HistoryDB`` (``<problem>.json``).

    Each row is one ``func_eval``: the tunable parameters as ``tuning_parameter``, the fixed
    ones as ``constants``, the objectives as ``evaluation_result`` (null where a trial failed),
    and the rest of the row (trial id, arm, round, status, error, other metrics) under
    ``additional_output``, which GPTune ignores and ``from_gptune_db`` reads back. ``time`` is
    the trial's ``finished_at`` (UTC) when the metrics have it. Objective values are not
    rounded to 6 digits as GPTune does, so the export loses nothing.
    """
    require_columns(history, (*ID_COLUMNS, *space.tunable_names), "history")
    require_columns(history, list(objectives), "history (objectives)")
    parameter_columns = set(space.names)
    software = {"loratune": {"version_split": [int(p) for p in __version__.split(".")[:3]]}}
    evaluations = []
    for row in history.to_dict("records"):
        row = {k: jsonable(v) for k, v in row.items()}
        row["status"] = row.get("status") or "ok"
        results = {name: row[name] for name in objectives}
        document = {
            "task_parameter": dict(GPTUNE_TASK),
            "tuning_parameter": {name: row[name] for name in space.tunable_names},
            "constants": dict(space.fixed),
            "machine_configuration": {"machine_name": machine_name},
            "software_configuration": software,
            "evaluation_result": results,
            "evaluation_detail": {
                name: {
                    "evaluations": [] if value is None else [value],
                    "objective_scheme": "average",
                }
                for name, value in results.items()
            },
            "additional_output": {k: v for k, v in row.items() if k not in parameter_columns and k not in objectives},
            "source": "measure",
            "uid": str(uuid.uuid5(_UID_NAMESPACE, f"seed{row['seed']}/trials/{row['trial_id']}")),
        }
        moment = _gptune_time(row.get("finished_at"))
        if moment is not None:
            document["time"] = moment
        evaluations.append(document)
    return {
        "tuning_problem_name": problem_name,
        "tuning_problem_category": None,
        "surrogate_model": [],
        "func_eval": evaluations,
    }


def from_gptune_db(db: Mapping[str, Any]) -> pd.DataFrame:
    """A history table from a GPTune 2.0.0 JSON database: one written by ``to_gptune_db``
    (its ``additional_output`` gives back the trial id, arm, round, status and metrics), or
    one GPTune wrote itself (parameters in original units, an objective GPTune could not
    measure as null; such a row has status ``failed``, the others ``ok``).

    Parameter columns come in the order the database lists them (tuning parameters, then
    constants); a file written with sorted keys lists them alphabetically.
    """
    if not isinstance(db, Mapping) or not isinstance(db.get("func_eval"), list):
        raise ValueError("GPTune database: expected an object with a 'func_eval' list")
    rows = []
    params: list[str] = []
    for index, evaluation in enumerate(db["func_eval"]):
        try:
            point = {**evaluation["tuning_parameter"], **(evaluation.get("constants") or {})}
            results = dict(evaluation["evaluation_result"])
            extra = dict(evaluation.get("additional_output") or {})
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"GPTune database: func_eval[{index}] lacks a tuning_parameter or evaluation_result object"
            ) from None
        if "status" not in extra:
            measured = all(isinstance(v, (int, float)) and np.isfinite(v) for v in results.values())
            extra["status"] = "ok" if measured else "failed"
        params += [p for p in point if p not in params]
        rows.append({**extra, **point, **results})
    if not rows:
        return pd.DataFrame(columns=[*ID_COLUMNS, "status"])
    history = _settle_types(pd.DataFrame.from_records(rows))
    return history[_order_columns(history.columns, params)]

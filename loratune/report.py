"""What the study report says, as plain data: the summary, the recommended trials with their
knee point, and the data of every figure.

Each function here takes the aggregated tables (trials.tsv, hypervolume.tsv, curves.tsv,
importance.tsv) and returns rows; ``loratune.plots`` only draws them (Optuna's
``_get_pareto_front_info`` / ``_make_scatter_object`` split), so each figure's numbers are
tested on data without a browser.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from loratune.early_stopping import STOPPED
from loratune.ledger import ID_COLUMNS, PILOT, require_columns
from loratune.pareto import (
    ALL_ARMS,
    arm_fronts,
    arms_in_order,
    normalize,
    to_minimization,
)
from loratune.space import ChoiceParam, FixedParam, FloatParam, IntParam, SearchSpace

__all__ = [
    "CURVE_COLUMNS",
    "space_summary",
    "trial_counts",
    "recommended_trials",
    "hypervolume_cost_curves",
    "slice_data",
    "contour_data",
    "curve_rows",
    "learning_curve_data",
    "timeline_data",
]

# One row per evaluation of a trial's learning curve (metrics.json "curve").
CURVE_COLUMNS = ["seed", "trial_id", "step", "eval_loss", "train_loss", "train_time"]


def _unique_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Each trial once per seed: a point two arms both proposed was trained once."""
    return trials.drop_duplicates(["seed", "trial_id"])


def space_summary(space: SearchSpace) -> str:
    """The search space in one line, in the config's own terms."""
    parts = []
    for param in space.params:
        if isinstance(param, FixedParam):
            parts.append(f"{param.name} = {param.value}")
        elif isinstance(param, ChoiceParam):
            parts.append(f"{param.name} in {{{', '.join(map(str, param.values))}}}")
        elif isinstance(param, (IntParam, FloatParam)):
            step = f" step {param.step}" if isinstance(param, IntParam) and param.step > 1 else ""
            parts.append(f"{param.name} {param.low:g} to {param.high:g}{step}{' (log)' if param.log else ''}")
    return "; ".join(parts)


def trial_counts(trials: pd.DataFrame) -> dict[str, Any]:
    """How many trials ran, by status, and the training seconds they took together (each
    trial once; a stopped or failed trial counts the seconds it trained)."""
    require_columns(trials, [*ID_COLUMNS, "status"], "trial_counts' trials table")
    unique = _unique_trials(trials)
    seconds = pd.to_numeric(unique["train_seconds"], errors="coerce") if "train_seconds" in unique else None
    return {
        "trials": len(unique),
        "ok": int((unique["status"] == "ok").sum()),
        "stopped": int((unique["status"] == STOPPED).sum()),
        "failed": int((~unique["status"].isin(["ok", STOPPED])).sum()),
        "train_seconds": float(seconds.sum()) if seconds is not None else math.nan,
    }


def recommended_trials(trials: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The Pareto set of each seed (all arms together, ``pareto.arm_fronts``' ``ALL_ARMS``
    front) with ``distance``, the Euclidean distance to the ideal point once each objective is
    scaled over the seed's Pareto set (its best value 0, its worst 1), and ``knee``: True on the
    front point of each seed closest to the ideal, the one balanced choice when no objective is
    preferred (the first such point on a tie). Scaled over the front, not over every trial: a
    study's diverged or far-off trials would otherwise squeeze the front's losses together and
    make the knee the cheapest point whatever its loss."""
    fronts = arm_fronts(trials, objectives)
    front = fronts[fronts["front"] == ALL_ARMS].drop(columns="front").reset_index(drop=True)
    if front.empty:
        return front.assign(distance=pd.Series(dtype=float), knee=pd.Series(dtype=bool))
    Y = to_minimization(front[list(objectives)].apply(pd.to_numeric).to_numpy(dtype=float), list(objectives.values()))
    distance = np.zeros(len(front))
    for _, per_seed in front.groupby("seed", sort=False):
        rows = per_seed.index.to_numpy()
        distance[rows] = np.linalg.norm(normalize(Y[rows], Y[rows].min(axis=0), Y[rows].max(axis=0)), axis=1)
    front = front.assign(distance=distance, knee=False)
    front.loc[front.groupby("seed", sort=False)["distance"].idxmin(), "knee"] = True
    return front


def hypervolume_cost_curves(curves: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Hypervolume against the cumulative ``cost`` column (train_seconds or train_steps) of
    each arm and seed: the rows of ``pareto.hypervolume_curves`` from the end of the pilot on
    (every arm's curve repeats the pilot's before), sorted by cost; rows without cost dropped."""
    require_columns(curves, ["arm", "seed", "n_trials", "hypervolume", cost], "hypervolume_cost_curves' table")
    parts = []
    pilot_end = curves.loc[curves["arm"] == PILOT].groupby("seed")["n_trials"].max()
    for (arm, seed), rows in curves.groupby(["arm", "seed"], sort=False):
        if arm != PILOT:
            rows = rows[rows["n_trials"] >= pilot_end.get(seed, 0)]
        parts.append(rows)
    table = pd.concat(parts, ignore_index=True) if parts else curves.iloc[:0]
    table = table[np.isfinite(pd.to_numeric(table[cost], errors="coerce"))]
    order = {arm: i for i, arm in enumerate(arms_in_order(curves["arm"]))}
    return table.sort_values(
        ["arm", "seed", cost], key=lambda c: c.map(order) if c.name == "arm" else c, kind="stable"
    ).reset_index(drop=True)


def slice_data(trials: pd.DataFrame, objectives: Mapping[str, str], space: SearchSpace) -> pd.DataFrame:
    """Each objective against each tuned parameter, one row per (trial, parameter, objective):
    seed, arm, trial_id, status, parameter, value, objective, objective_value. Trials without a
    finite value of the objective (failed ones) are left out; stopped ones stay (the figure
    marks them: their value was measured after fewer steps)."""
    require_columns(trials, [*ID_COLUMNS, "status", *space.tunable_names, *objectives], "slice_data's trials table")
    rows = []
    for objective in objectives:
        values = pd.to_numeric(trials[objective], errors="coerce")
        kept = trials[np.isfinite(values)]
        for name in space.tunable_names:
            rows.append(
                pd.DataFrame(
                    {
                        "seed": kept["seed"],
                        "arm": kept["arm"],
                        "trial_id": kept["trial_id"],
                        "status": kept["status"],
                        "parameter": name,
                        "value": kept[name],
                        "objective": objective,
                        "objective_value": values[kept.index],
                    }
                )
            )
    columns = ["seed", "arm", "trial_id", "status", "parameter", "value", "objective", "objective_value"]
    return pd.concat(rows, ignore_index=True)[columns] if rows else pd.DataFrame(columns=columns)


CONTOUR_PARAMS = ("learning_rate", "lora_alpha", "lora_rank")


def contour_data(
    trials: pd.DataFrame, objective: str, space: SearchSpace, resolution: int = 60
) -> dict[str, Any] | None:
    """``objective`` over log10(learning rate) x log2(alpha / rank) (the two numbers the LoRA
    update's size depends on), interpolated linearly between the ok trials (scipy's
    ``griddata``; NaN outside their convex hull, so nothing is extrapolated) on a
    ``resolution`` x ``resolution`` grid: {x, y, z, points}; ``points`` holds the trials
    (trial_id, seed, arm, x, y, value). None when the space lacks one of the three parameters
    or fewer than three distinct ok points span a plane."""
    from scipy.interpolate import griddata
    from scipy.spatial import QhullError

    if not all(name in space.names for name in CONTOUR_PARAMS):
        return None
    values = pd.to_numeric(trials[objective], errors="coerce")
    ok = trials[(trials["status"] == "ok") & np.isfinite(values)]

    def column(name: str) -> pd.Series:
        source = ok[name] if name in ok.columns else pd.Series(space.fixed[name], index=ok.index)
        return pd.to_numeric(source, errors="coerce").astype(float)

    points = pd.DataFrame(
        {
            "trial_id": ok["trial_id"],
            "seed": ok["seed"],
            "arm": ok["arm"],
            "x": np.log10(column("learning_rate")),
            "y": np.log2(column("lora_alpha") / column("lora_rank")),
            "value": values[ok.index],
        }
    ).reset_index(drop=True)
    # A point measured twice (two seeds) is one grid node, at its mean.
    nodes = points.groupby(["x", "y"], as_index=False)["value"].mean()
    if len(nodes) < 3:
        return None
    x = np.linspace(nodes["x"].min(), nodes["x"].max(), resolution)
    y = np.linspace(nodes["y"].min(), nodes["y"].max(), resolution)
    try:
        z = griddata(nodes[["x", "y"]].to_numpy(), nodes["value"].to_numpy(), tuple(np.meshgrid(x, y)), method="linear")
    except QhullError:  # all points on one line
        return None
    return {"x": x, "y": y, "z": z, "points": points}


def curve_rows(seed: Any, trial_id: str, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``CURVE_COLUMNS`` for one trial's metrics.json ``curve`` (none without one)."""
    curve = metrics.get("curve") or []
    return [{"seed": seed, "trial_id": trial_id, **{c: point.get(c) for c in CURVE_COLUMNS[2:]}} for point in curve]


def learning_curve_data(curves: pd.DataFrame, trials: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """curves.tsv joined with each trial's arm (the first that proposed it, the pilot where it
    is one), status and ``on_front`` (in its seed's Pareto set), sorted by seed, trial, step."""
    require_columns(curves, CURVE_COLUMNS, "learning_curve_data's curves table")
    fronts = arm_fronts(trials, objectives)
    front = fronts[fronts["front"] == ALL_ARMS]
    on_front = set(zip(front["seed"], front["trial_id"]))
    owners = _unique_trials(trials)[["seed", "trial_id", "arm", "status"]]
    table = curves.merge(owners, on=["seed", "trial_id"], how="inner")
    table["on_front"] = [(s, t) in on_front for s, t in zip(table["seed"], table["trial_id"])]
    return table.sort_values(["seed", "trial_id", "step"], kind="stable").reset_index(drop=True)


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def _lane_name(hostname: Any, devices: Any) -> str:
    host = hostname if isinstance(hostname, str) and hostname else "unknown host"
    if devices is None or (isinstance(devices, float) and math.isnan(devices)) or str(devices) == "":
        return f"{host} (no GPU)"
    return f"{host} GPU {devices}"


def timeline_data(trials: pd.DataFrame) -> pd.DataFrame:
    """When each trial ran and where: one row per trial (once per seed) with start, finish
    (datetimes from started_at/finished_at), device (hostname and CUDA_VISIBLE_DEVICES) and
    lane: trials that overlap on one device (CPU runs, or several per GPU) get lanes "#2",
    "#3"... of it, filled greedily by start time. Trials without both times are left out."""
    require_columns(trials, [*ID_COLUMNS, "status"], "timeline_data's trials table")
    unique = _unique_trials(trials)
    empty = pd.Series([None] * len(unique), index=unique.index, dtype=object)
    rows = []
    for record, host, devices in zip(
        unique.to_dict("records"), unique.get("hostname", empty), unique.get("cuda_visible_devices", empty)
    ):
        start, finish = _parse_time(record.get("started_at")), _parse_time(record.get("finished_at"))
        if start is None or finish is None:
            continue
        rows.append(
            {
                "seed": record["seed"],
                "arm": record["arm"],
                "trial_id": record["trial_id"],
                "status": record["status"],
                "start": start,
                "finish": finish,
                "device": _lane_name(host, devices),
            }
        )
    columns = ["seed", "arm", "trial_id", "status", "start", "finish", "device", "lane"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows).sort_values(["device", "start", "finish"], kind="stable").reset_index(drop=True)
    lanes = []
    for _, per_device in table.groupby("device", sort=False):
        busy_until: list[datetime] = []
        for start, finish in zip(per_device["start"], per_device["finish"]):
            free = next((i for i, until in enumerate(busy_until) if until <= start), None)
            if free is None:
                busy_until.append(finish)
                free = len(busy_until) - 1
            else:
                busy_until[free] = finish
            lanes.append(free)
    table["lane"] = [d if lane == 0 else f"{d} #{lane + 1}" for d, lane in zip(table["device"], lanes)]
    return table[columns]


def first_loss_objective(objectives: Iterable[str]) -> str:
    """The objective the contour shows: the first whose name says loss, else the first."""
    names = list(objectives)
    return next((n for n in names if "loss" in n), names[0])

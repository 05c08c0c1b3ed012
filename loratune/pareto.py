"""Pareto dominance and hypervolume: the numbers every plot and comparison is built on.

Everything here works in *minimization space*: objectives to maximize are negated first
(``to_minimization``). Hypervolumes that compare arms are taken in a normalized space where
the worst and best values seen over the whole study map to 1 and 0, with the reference point
at ``REFERENCE`` (1.1) in every objective, so that a point on the worst edge still counts.

Non-dominated sorting and the hypervolume itself are moocore's: on random and spherical fronts
of 2-4 objectives it agrees with our former exact code to 1e-15 and is faster in every case
measured: the hypervolume 2-4x with two objectives, 25-15,000x with three or four, the sorting
up to 12,000x (``bench/results/pareto_libraries_e45c45e.md``). What stays here is what a
study's tables need around it: results are the trials with a status of ``RESULT_STATUSES``
(a trial early stopping stopped at a rung counts at the values it recorded there), failed
trials (and non-finite rows) are on no front and dominate nothing, points outside the reference box count for nothing, and ``best_subset_hypervolumes``,
which no library has.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from loratune.ledger import ID_COLUMNS, PILOT, RESULT_STATUSES, require_columns

__all__ = [
    "REFERENCE",
    "SENSES",
    "to_minimization",
    "non_dominated",
    "RESULT_STATUSES",
    "result_mask",
    "distinct_trials",
    "pareto_front",
    "ALL_ARMS",
    "arms_in_order",
    "front_label",
    "arm_fronts",
    "hypervolume",
    "best_subset_hypervolumes",
    "normalization_bounds",
    "normalize",
    "hypervolume_curves",
    "COST_COLUMNS",
]

SENSES = ("min", "max")
# Cost columns of a hypervolume curve -> the trial metric each one adds up: every trial's
# training seconds and steps (stopped and failed ones included, as far as they got), so arms
# with and without early stopping compare at equal cost.
COST_COLUMNS = {"train_seconds": "train_seconds", "train_steps": "steps"}
REFERENCE = 1.1
# The ``front`` of ``arm_fronts`` that holds every arm of a seed together: the study's Pareto set.
ALL_ARMS = "all arms"


def to_minimization(Y, senses: Sequence[str]) -> np.ndarray:
    """``Y`` (n, m) as floats with every "max" column negated."""
    Y = np.array(Y, dtype=float, ndmin=2)
    senses = list(senses)
    if Y.shape[1] != len(senses):
        raise ValueError(f"objectives: {len(senses)} senses for {Y.shape[1]} objective columns")
    for sense in senses:
        if sense not in SENSES:
            raise ValueError(f"objectives: sense must be one of {list(SENSES)}, got {sense!r}")
    sign = np.array([-1.0 if s == "max" else 1.0 for s in senses])
    return Y * sign


def non_dominated(Y_min) -> np.ndarray:
    """True for rows that no other row dominates (no worse everywhere, better somewhere).

    Equal rows do not dominate each other, so every copy of a front point is kept. Rows with
    a non-finite value are never on the front and dominate nothing.
    """
    Y = np.array(Y_min, dtype=float, ndmin=2)
    finite = np.isfinite(Y).all(axis=1)
    mask = np.zeros(len(Y), dtype=bool)
    if finite.any():
        # Imported here: the config check imports this module, and moocore takes 0.2 s to load.
        import moocore

        # keep_weakly: a copy of a front point is not dominated by it (moocore's default drops it).
        mask[np.flatnonzero(finite)] = moocore.is_nondominated(Y[finite], keep_weakly=True)
    return mask


def result_mask(df: pd.DataFrame, objectives: Mapping[str, str]) -> np.ndarray:
    """Rows that are results: a status of ``RESULT_STATUSES`` (when there is a status; a
    stopped trial counts at its recorded values) and finite objective values."""
    missing = [name for name in objectives if name not in df.columns]
    if missing:
        raise ValueError(f"objectives: {missing} not among the table's columns {list(df.columns)}")
    keep = np.isfinite(_objective_values(df, objectives)).all(axis=1)
    if "status" in df.columns:
        keep &= df["status"].astype(str).isin(RESULT_STATUSES).to_numpy()
    return keep


def _objective_values(df: pd.DataFrame, objectives: Mapping[str, str]) -> np.ndarray:
    """The objective columns as floats (unparseable values become NaN), not yet signed."""
    return df[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)


def distinct_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial of one seed (a trial two arms proposed counts once): the row that
    trained furthest (the most ``steps``, when the table has them: a trial one arm stopped at a
    rung and another trained fully is the full one, whose adapter its folder keeps), ties to
    the first row; rows stay in table order."""
    if "steps" not in trials.columns:
        return trials.drop_duplicates("trial_id")
    steps = pd.to_numeric(trials["steps"], errors="coerce").fillna(-1)
    furthest = trials.assign(_steps=steps).sort_values("_steps", ascending=False, kind="stable")
    return trials.loc[furthest.drop_duplicates("trial_id").index.sort_values()]


def pareto_front(df: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The non-dominated results of ``df`` (``result_mask``), sorted by the first objective."""
    ok = df[result_mask(df, objectives)]
    Y = to_minimization(_objective_values(ok, objectives), list(objectives.values()))
    front = ok[non_dominated(Y)] if len(ok) else ok
    return front.sort_values(next(iter(objectives)), kind="stable")


def arms_in_order(arms: Sequence[str]) -> list[str]:
    """The pilot first, then the arms as they first appear: the order of every figure and curve."""
    return [PILOT] + [a for a in pd.unique(pd.Series(arms, dtype=object)) if a != PILOT]


def front_label(arm: str) -> str:
    """The name of the front an arm reaches: its own trials with its seed's pilot."""
    return PILOT if arm == PILOT else f"{PILOT} + {arm}"


def arm_fronts(trials: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The fronts a study's figures and tables show, as plain rows: per seed (ascending), the
    front of all arms together (``front`` is ``ALL_ARMS``; a trial two arms proposed counts once,
    as ``distinct_trials`` picks it: the row that trained furthest, else the first, the pilot's
    where it is one), then the pilot's front and the
    front of pilot + each arm (``front`` is ``front_label(arm)``), arms in ``arms_in_order``.

    ``trials`` is the study's tidy table (``ledger.collect_trials``); the result holds its
    front rows, each sorted as ``pareto_front`` sorts them, with the column ``front`` added.
    """
    require_columns(trials, [*ID_COLUMNS, "status", *objectives], "arm_fronts' trials table")
    arms = arms_in_order(trials["arm"])
    parts = []
    for _, per_seed in trials.groupby("seed", sort=True):
        parts.append(pareto_front(distinct_trials(per_seed), objectives).assign(front=ALL_ARMS))
        for arm in arms:
            members = per_seed[per_seed["arm"].isin({PILOT, arm})]
            parts.append(pareto_front(members, objectives).assign(front=front_label(arm)))
    if not parts:
        return trials.assign(front=pd.Series(dtype=object))
    return pd.concat(parts, ignore_index=True)


def hypervolume(Y_min, ref) -> float:
    """The volume dominated by the points of ``Y_min`` and bounded by ``ref``; exact.

    A point contributes only if it is strictly better than ``ref`` in every objective; rows with
    a non-finite value (failed trials) never do.
    """
    ref = np.array(ref, dtype=float).ravel()
    Y = np.array(Y_min, dtype=float, ndmin=2)
    if Y.size == 0:
        return 0.0
    if Y.shape[1] != ref.shape[0]:
        raise ValueError(f"hypervolume: reference point has {ref.shape[0]} values for {Y.shape[1]} objectives")
    Y = Y[np.isfinite(Y).all(axis=1) & (Y < ref).all(axis=1)]
    if len(Y) == 0:
        return 0.0
    import moocore

    return float(moocore.hypervolume(Y, ref=ref))


def best_subset_hypervolumes(front, ref, k_max: int) -> np.ndarray:
    """For k = 1..k_max, the largest hypervolume that k of the two-objective points
    ``front`` can dominate together (exact, by dynamic programming over the points sorted
    by the first objective): how close k perfectly placed trials could get.

    Only non-dominated points strictly inside ``ref`` can count; with fewer of them than k,
    the value stays at the whole set's hypervolume.
    """
    ref = np.array(ref, dtype=float).ravel()
    F = np.array(front, dtype=float, ndmin=2)
    if F.shape[1] != 2 or ref.shape != (2,):
        raise ValueError("best_subset_hypervolumes: needs two objectives and a two-value reference point")
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"best_subset_hypervolumes: k_max must be an integer >= 1, got {k_max!r}")
    F = F[np.isfinite(F).all(axis=1) & (F < ref).all(axis=1)]
    F = np.unique(F[non_dominated(F)], axis=0)  # sorted by f1; on a front f2 then falls
    if len(F) == 0:
        return np.zeros(k_max)
    x, y = F[:, 0], F[:, 1]
    width = ref[0] - x
    # best[i]: the largest volume of j points whose last (largest f1) point is i. Adding i
    # after i' < i adds the strip (ref0 - x_i) * (y_i' - y_i).
    best = width * (ref[1] - y)
    out = [best.max()]
    earlier = np.tril(np.ones((len(F), len(F)), dtype=bool), k=-1)  # [i, i'] with i' < i
    for _ in range(1, k_max):
        gain = best[None, :] + width[:, None] * (y[None, :] - y[:, None])
        best = np.where(earlier, gain, -np.inf).max(axis=1, initial=-np.inf)
        out.append(max(out[-1], best.max()))
    return np.array(out, dtype=float)


def normalization_bounds(df: pd.DataFrame, objectives: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Per objective, the best and the worst value of the results, in minimization space."""
    ok = df[result_mask(df, objectives)]
    if len(ok) == 0:
        raise ValueError("normalization_bounds: no trial with a result (status ok or stopped, finite objective values)")
    Y = to_minimization(_objective_values(ok, objectives), list(objectives.values()))
    return Y.min(axis=0), Y.max(axis=0)


def normalize(Y_min, lower, upper) -> np.ndarray:
    """Map ``lower`` to 0 and ``upper`` to 1; an objective that never varied keeps scale 1."""
    lower = np.asarray(lower, dtype=float)
    span = np.asarray(upper, dtype=float) - lower
    span = np.where(span > 0, span, 1.0)
    return (np.array(Y_min, dtype=float, ndmin=2) - lower) / span


def hypervolume_curves(
    trials: pd.DataFrame,
    objectives: Mapping[str, str],
    bounds: tuple[Sequence[float], Sequence[float]] | None = None,
    ref: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Hypervolume after each trial, per seed and arm: columns arm, seed, n_trials, hypervolume,
    then the cumulative cost so far (``COST_COLUMNS``: train_seconds, train_steps; a trial
    without the metric adds 0, a table without the column gives NaN).

    An arm's curve runs through its seed's pilot trials (arm ``pilot``, in table order) and
    then the arm's own trials in round order; the pilot also gets a curve of its own. A trial
    early stopping stopped enters at the values of the highest rung it reached (its row in the
    table) and adds the seconds and steps of every rung it trained. Failed trials count as
    trials and add their cost but no volume. Values are normalized by ``bounds``, (lower, upper)
    in minimization space as ``normalization_bounds`` gives them (default: over the results of
    the whole table, so that arms and seeds share one scale), and measured against ``ref`` in
    that normalized space (default ``REFERENCE`` in every objective).
    """
    require_columns(trials, ID_COLUMNS, "hypervolume_curves' trials table")
    # Positions, not the caller's index labels, tie each row to its result flag and values.
    trials = trials.reset_index(drop=True)
    ok_all = result_mask(trials, objectives)
    Y_all = to_minimization(_objective_values(trials, objectives), list(objectives.values()))
    if ref is None:
        ref = np.full(len(objectives), REFERENCE)
    if bounds is None and ok_all.any():
        bounds = normalization_bounds(trials, objectives)
    if bounds is not None:
        Y_all = normalize(Y_all, *bounds)
    cost_all = {}
    for name, metric in COST_COLUMNS.items():
        if metric in trials.columns:
            cost_all[name] = pd.to_numeric(trials[metric], errors="coerce").fillna(0.0).to_numpy(dtype=float)
        else:
            cost_all[name] = np.full(len(trials), np.nan)

    rows = []
    for seed, per_seed in trials.groupby("seed", sort=True):
        pilot = per_seed[per_seed["arm"] == PILOT]
        for arm in arms_in_order(per_seed["arm"]):
            own = per_seed[per_seed["arm"] == arm].sort_values("round", kind="stable")
            sequence = pilot if arm == PILOT else pd.concat([pilot, own])
            positions = sequence.index.to_numpy()
            volumes = _running_hypervolume(Y_all[positions], ok_all[positions], ref)
            spent = {name: np.cumsum(cost_all[name][positions]) for name in COST_COLUMNS}
            for k, volume in enumerate(volumes):
                cost = {name: spent[name][k] for name in COST_COLUMNS}
                rows.append({"arm": arm, "seed": seed, "n_trials": k + 1, "hypervolume": volume, **cost})
    return pd.DataFrame(rows, columns=["arm", "seed", "n_trials", "hypervolume", *COST_COLUMNS])


def _running_hypervolume(Y: np.ndarray, ok: np.ndarray, ref) -> list[float]:
    """The hypervolume of the results among the first k rows, for every k."""
    ref = np.asarray(ref, dtype=float)
    volumes, current = [], 0.0
    for k in range(len(Y)):
        # Only a result inside the reference box can change the volume.
        if ok[k] and (Y[k] < ref).all():
            current = hypervolume(Y[: k + 1][ok[: k + 1]], ref)
        volumes.append(current)
    return volumes

"""Multi-objective successive halving inside a round: rungs, and who goes on to the next one.

An arm with ``early_stopping: {rungs: [f_0, ..., 1.0], keep: k}`` trains its round's trials to
the first rung (``f_0`` of the step budget), keeps the best fraction ``k`` of them (at least
one), trains those to the next rung, and so on; a trial that is not promoted stops where it is
and is recorded with status ``stopped`` (its curve and its cost so far included). A stopped
trial is a result: its values are those of its selected checkpoint up to its rung, whose
adapter it keeps, so fronts and hypervolumes count it (``ledger.RESULT_STATUSES``).

"Best" with several objectives is by non-dominated sorting: whole fronts are kept in order, and
inside the front that does not fit, the trials with the largest crowding distance (NSGA-II's
diversity measure) go on, so the promoted set spreads along the front instead of clustering.
Values are compared as measured at the rung: a cost such as ``train_time`` is the cost so far,
which is what the rung says about the full run when cost grows with steps. A trial that failed
or diverged (status not ``ok``, or an objective that is not finite) is never promoted: it stops
at once.

The learning-rate schedule always spans the full step budget (``loratune.training``), so a trial
stopped at a rung is exactly the prefix of its full run and a promoted trial continues it; it is
*not* a short trial with a schedule compressed into the rung's steps. Early decisions therefore
judge the run that would be finished, at the cost of a high learning rate still at its peak at
an early rung (with a cosine schedule, the loss at rung 0 is the loss before any decay).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from loratune.ledger import STOPPED
from loratune.pareto import REFERENCE, hypervolume, non_dominated, normalize, to_minimization

__all__ = [
    "EarlyStopping",
    "PROMOTIONS",
    "STUDY_PROMOTIONS",
    "crowding_distance",
    "non_dominated_fronts",
    "predict_final",
    "multi_fidelity_final",
    "update_scale",
    "promotion",
    "rung_results",
    "successive_halving",
    "STOPPED",
]


# How a rung picks the trials it promotes (``promotion``): "crowding", whole non-dominated fronts
# then NSGA-II's crowding distance; "hypervolume", greedily the trials that add most to the
# rung's hypervolume, normalized as the benchmarks normalize a front (``rung_scale``).
# "predicted", as "crowding" but on each trial's predicted value at the full budget
# (``predict_final``) where a learning curve gives one, known values (costs) as measured;
# "multi_fidelity", the same with the prediction of ``multi_fidelity_final``.
PROMOTIONS = ("crowding", "hypervolume", "predicted", "multi_fidelity")
# The rules a study's promote job applies: "predicted" and "multi_fidelity" need the curves of
# the arm's earlier trials, which only bench/early_stopping.py passes (README).
STUDY_PROMOTIONS = ("crowding", "hypervolume")
# The neighbours (in update scale) whose rung-to-final gain ``predict_final`` takes the median of.
NEIGHBOURS = 3


@dataclass(frozen=True)
class EarlyStopping:
    """Rungs as fractions of the step budget (increasing, in (0, 1], the last 1.0), the
    fraction of a rung's trials promoted to the next one, and how they are picked."""

    rungs: tuple[float, ...]
    keep: float
    promote: str = "crowding"

    @classmethod
    def from_config(cls, spec: Mapping[str, Any], field: str = "early_stopping") -> "EarlyStopping":
        """Checked settings; a bad value raises a one-line ``ValueError`` naming ``field``."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"{field}: must be a mapping {{rungs: [...], keep: ...}}, got {spec!r}")
        unknown = sorted(set(spec) - {"rungs", "keep", "promote"})
        if unknown:
            raise ValueError(f"{field}: unknown setting(s) {unknown}; expected rungs, keep and promote")
        rungs, keep = spec.get("rungs"), spec.get("keep")
        if not isinstance(rungs, Sequence) or isinstance(rungs, str) or not rungs:
            raise ValueError(f"{field}.rungs: must be a non-empty list of fractions of the step budget, got {rungs!r}")
        for value in rungs:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{field}.rungs: every rung must be a fraction in (0, 1], got {value!r}")
        if any(b <= a for a, b in zip(rungs, rungs[1:])):
            raise ValueError(f"{field}.rungs: must increase, got {list(rungs)}")
        if rungs[-1] != 1:
            raise ValueError(f"{field}.rungs: the last rung must be 1.0 (the full budget), got {rungs[-1]!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep < 1:
            raise ValueError(f"{field}.keep: must be a fraction in (0, 1), got {keep!r}")
        promote = spec.get("promote", "crowding")
        if promote not in PROMOTIONS:
            raise ValueError(f"{field}.promote: must be one of {list(PROMOTIONS)}, got {promote!r}")
        return cls(tuple(float(r) for r in rungs), float(keep), promote)

    def rung_steps(self, max_steps: int, field: str = "early_stopping.rungs") -> list[int]:
        """The step each rung ends at for a budget of ``max_steps``; the last is ``max_steps``.
        Rungs that round to the same step would train nothing between them: an error."""
        steps = [max(1, int(round(fraction * max_steps))) for fraction in self.rungs]
        steps[-1] = int(max_steps)
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(
                f"{field}: {list(self.rungs)} of {max_steps} steps gives rungs at steps {steps}; "
                "two rungs end at the same step (fewer rungs or more steps)"
            )
        return steps

    def n_keep(self, n: int) -> int:
        """How many of ``n`` trials at a rung go on: the ``keep`` fraction rounded down, at least one."""
        return max(1, int(math.floor(self.keep * n + 1e-9))) if n else 0


def non_dominated_fronts(Y_min: np.ndarray) -> list[np.ndarray]:
    """Row indices of ``Y_min`` by non-dominated front (front 0 first), each in row order.
    Rows with a non-finite value are in no front."""
    Y = np.array(Y_min, dtype=float, ndmin=2)
    remaining = np.flatnonzero(np.isfinite(Y).all(axis=1))
    fronts = []
    while len(remaining):
        mask = non_dominated(Y[remaining])
        fronts.append(remaining[mask])
        remaining = remaining[~mask]
    return fronts


def crowding_distance(Y_min: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row within the set ``Y_min``: per objective, the
    extreme rows get infinity and the others the gap between their neighbours, divided by the
    objective's range in the set; summed over objectives. An objective that does not vary
    adds nothing."""
    Y = np.array(Y_min, dtype=float, ndmin=2)
    n = len(Y)
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for column in Y.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        if span <= 0:
            continue
        distance[order[0]] = distance[order[-1]] = np.inf
        distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


def rung_scale(Y_min: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rung's normalization for ``promote: hypervolume`` (finite rows of ``Y_min``): per
    objective 0 at its front's best value, 1 at the larger of the front's worst value and the
    median of the rung's trials -- the benchmarks' convention (bench/efficiency/runner.py
    ``Scale.of_table``), so that a trial worse than the rung's median in some objective, which such a
    hypervolume does not count, does not take a promotion that one it counts could have."""
    front = Y_min[non_dominated(Y_min)]
    return front.min(axis=0), np.maximum(front.max(axis=0), np.median(Y_min, axis=0))


def _greedy_hypervolume(Y_min: np.ndarray, n_keep: int) -> list[int]:
    """Up to ``n_keep`` row indices, each adding the most hypervolume (``rung_scale``, reference
    1.1) to the ones picked before it (ties: the earlier row); stops when none adds any."""
    lower, upper = rung_scale(Y_min)
    Y = normalize(Y_min, lower, upper)
    ref = np.full(Y.shape[1], REFERENCE)
    chosen: list[int] = []
    current = 0.0
    while len(chosen) < n_keep:
        gains = [(hypervolume(Y[chosen + [i]], ref) - current, -i) for i in range(len(Y)) if i not in chosen]
        if not gains:
            break
        gain, best = max(gains)
        if gain <= 1e-15:
            break
        chosen.append(-best)
        current += gain
    return chosen


def update_scale(point: Mapping[str, Any]) -> float:
    """log(learning_rate * lora_alpha / lora_rank): the size of a LoRA update, the coordinate the
    measured tables' curve shapes follow (a large one falls fast, then overfits; a small one
    starts slowly); NaN when the point lacks one of the three."""
    try:
        value = float(point["learning_rate"]) * float(point["lora_alpha"]) / float(point["lora_rank"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return math.nan
    return math.log(value) if value > 0 else math.nan


def _gain(curve: Sequence[Mapping[str, Any]], objective: str, step: int, sign: float) -> float:
    """How much better a complete curve's best value is than its best up to ``step`` (<= 0 in
    minimization form); NaN when the curve has no finite value up to ``step``."""
    values = [(int(r["step"]), sign * float(r[objective])) for r in curve if r.get(objective) is not None]
    values = [(s, v) for s, v in values if math.isfinite(v)]
    early = [v for s, v in values if s <= step]
    return min(v for _, v in values) - min(early) if early else math.nan


def predict_final(
    points: Sequence[Mapping[str, Any]],
    values: Sequence[float],
    step: int,
    reference: Sequence[Mapping[str, Any]],
    objective: str,
    sense: str = "min",
    neighbours: int = NEIGHBOURS,
) -> np.ndarray:
    """Each trial's predicted best ``objective`` at the full budget, from its best value up to
    ``step`` (``values``) and the complete learning curves of ``reference`` (trials trained to
    the full budget, each ``{**point, "curve": [{step, objective, ...}, ...]}``): its value plus
    the median gain from ``step`` to the end of the ``neighbours`` reference runs nearest in
    ``update_scale`` (all of them where a scale is missing). Robust by construction: a median of
    measured gains, no fitted slope to extrapolate. No usable reference: the values as they are."""
    sign = 1.0 if sense == "min" else -1.0
    gains, scales = [], []
    for run in reference:
        gain = _gain(run.get("curve") or [], objective, step, sign)
        if math.isfinite(gain):
            gains.append(gain)
            scales.append(update_scale(run))
    out = np.array(values, dtype=float)
    if not gains:
        return out
    gains, scales = np.array(gains), np.array(scales)
    known = np.isfinite(scales)
    for i, point in enumerate(points):
        scale = update_scale(point)
        if math.isfinite(scale) and known.any():
            nearest = np.argsort(np.abs(scales[known] - scale), kind="stable")[:neighbours]
            gain = np.median(gains[known][nearest])
        else:
            gain = np.median(gains)
        out[i] += sign * gain
    return out


def multi_fidelity_final(
    points: Sequence[Mapping[str, Any]],
    values: Sequence[float],
    steps: Sequence[int],
    reference: Sequence[Mapping[str, Any]],
    objective: str,
    max_steps: int,
    parameters: Sequence[str],
    sense: str = "min",
) -> np.ndarray:
    """Each trial's predicted best ``objective`` at the full budget: its best value up to its
    step (``values``, ``steps``) plus the gain to the end that one Gaussian process predicts at
    its parameters and step. The process models that gain (the final best minus the best so
    far, <= 0 in minimization form) over (``parameters``, each on a log scale where positive,
    scaled to [0, 1]; log(step / max_steps)), fitted on every evaluation of the complete curves
    of ``reference`` (trials as ``{**point, "curve": [{step, objective, ...}, ...]}``; a curve that
    ends before ``max_steps`` has no known gain and is left out). So a rung is judged by how
    curves like each trial's went on, not by where they stand now (on the self-instruct table the
    best runs start slowly, behind runs that overfit later); far from every complete curve the
    gain reverts to their mean. A predicted gain is never a loss (a best value so far cannot get
    worse). Fewer than 3 such evaluations: the values as they are.

    Modelled on the value itself (a GP over the best-so-far values of every curve, the gain the
    difference of its predictions) it predicted far too little gain on the instructions table
    (2.34 at step 10 -> 2.28, measured 0.46) and needed more seconds there (README)."""
    sign = 1.0 if sense == "min" else -1.0
    out = np.array(values, dtype=float)
    rows, y = [], []
    for run in reference:
        curve = sorted(
            (int(r["step"]), sign * float(r[objective]))
            for r in run.get("curve") or []
            if r.get(objective) is not None and math.isfinite(float(r[objective]))
        )
        if not curve or curve[-1][0] < max_steps:
            continue
        final, best = min(v for _, v in curve), math.inf
        for step, value in curve:
            best = min(best, value)
            rows.append(({name: run[name] for name in parameters}, step))
            y.append(final - best)
    if len(y) < 3 or not len(out):
        return out
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    def raw(params: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return np.array([[float(p[name]) for name in parameters] for p in params], dtype=float)

    known, mine = raw([p for p, _ in rows]), raw(points)
    both = np.vstack([known, mine])
    logged = (both > 0).all(axis=0)
    both[:, logged] = np.log(both[:, logged])
    low, span = both.min(axis=0), np.ptp(both, axis=0)
    unit = (both - low) / np.where(span > 0, span, 1.0)
    X = np.column_stack([unit[: len(known)], np.log([s / max_steps for _, s in rows])])
    kernel = ConstantKernel() * Matern(length_scale=np.ones(X.shape[1]), nu=2.5) + WhiteKernel(1e-3)
    model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter of the kernel's hyperparameter fit
        model.fit(X, np.array(y))
    at = np.column_stack([unit[len(known) :], np.log(np.asarray(steps, dtype=float) / max_steps)])
    return out + sign * np.minimum(model.predict(at), 0.0)


def promotion(
    results: pd.DataFrame,
    objectives: Mapping[str, str],
    n_keep: int,
    promote: str = "crowding",
    reference: Sequence[Mapping[str, Any]] = (),
) -> pd.DataFrame:
    """Which trials of a rung go on to the next one.

    ``results`` has one row per trial at the rung: ``trial_id``, ``status`` and the objective
    columns as measured at the rung. Returns it (in the same order) with ``front`` (0 is the
    best; missing for a trial that failed), ``crowding`` (within its front) and ``promoted``.
    ``promote="crowding"``: whole fronts in order while they fit into ``n_keep``, then the
    largest crowding distances of the next front (ties: the earlier row). ``"hypervolume"``:
    first the trials that add most to the rung's hypervolume (``_greedy_hypervolume``), then,
    while places are left, as ``"crowding"`` fills them among the rest. ``"predicted"``: as
    ``"crowding"``, each objective that ``reference``'s curves record (``predict_final``; a
    cost such as ``trainable_params`` is known exactly and stays as measured) replaced by its
    prediction at the full budget, written as ``predicted_<objective>``; it needs the point's
    parameters and ``step`` in ``results``. ``"multi_fidelity"``: the same with
    ``multi_fidelity_final``'s prediction, the parameters every numeric column of ``results``
    besides the rung's.
    """
    if promote not in PROMOTIONS:
        raise ValueError(f"promotion: promote must be one of {list(PROMOTIONS)}, got {promote!r}")
    missing = [c for c in ("trial_id", "status", *objectives) if c not in results.columns]
    if missing:
        raise ValueError(f"promotion: the rung's results lack column(s) {missing}")
    table = results.reset_index(drop=True).copy()
    values = table[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float, copy=True)
    if promote in ("predicted", "multi_fidelity"):
        # Curves record losses; train_time there is the cost so far, which stays as measured.
        recorded = {k for run in reference for row in run.get("curve") or [] for k in row} - {"step", "train_time"}
        step = int(table["step"].max()) if len(table) else 0
        if promote == "multi_fidelity" and recorded:
            parameters = [
                c
                for c in table.columns
                if c not in {"trial_id", "rung", "step", "status", *objectives}
                and pd.api.types.is_numeric_dtype(table[c])
            ]
            # The budget: the longest reference curve's last step (a complete run's).
            budget = max(int(row["step"]) for run in reference for row in run.get("curve") or [])
        for j, (name, sense) in enumerate(objectives.items()):
            if name not in recorded:
                continue
            if promote == "predicted":
                values[:, j] = predict_final(table.to_dict("records"), values[:, j], step, reference, name, sense)
            else:
                values[:, j] = multi_fidelity_final(
                    table.to_dict("records"),
                    values[:, j],
                    [step] * len(table),
                    reference,
                    name,
                    budget,
                    parameters,
                    sense,
                )
            table[f"predicted_{name}"] = values[:, j]
    Y = to_minimization(values.reshape(len(table), len(objectives)), list(objectives.values()))
    alive = (table["status"].astype(str) == "ok").to_numpy() & np.isfinite(Y).all(axis=1)
    Y[~alive] = np.nan  # a failed or diverged trial is in no front: it stops here
    front = np.full(len(table), np.nan)
    crowding = np.full(len(table), np.nan)
    promoted = np.zeros(len(table), dtype=bool)
    left = int(n_keep)
    if promote == "hypervolume" and alive.any():
        rows = np.flatnonzero(alive)
        promoted[rows[_greedy_hypervolume(Y[rows], left)]] = True
        left -= int(promoted.sum())
    for rank, members in enumerate(non_dominated_fronts(Y)):
        distances = crowding_distance(Y[members])
        front[members], crowding[members] = rank, distances
        members_left = members[~promoted[members]]
        if left <= 0 or not len(members_left):
            continue
        distances = distances[~promoted[members]]
        members = members_left
        if len(members) <= left:
            chosen = members
        else:
            # Largest crowding first; a stable sort keeps row order among equal distances.
            chosen = members[np.argsort(-distances, kind="stable")[:left]]
        promoted[chosen] = True
        left -= len(chosen)
    table["front"], table["crowding"], table["promoted"] = front, crowding, promoted
    return table


def rung_results(
    records: Mapping[str, Mapping[str, Any]],
    objectives: Mapping[str, str],
    rung: int,
    step: int,
    points: Mapping[str, Mapping[str, Any]] | None = None,
):
    """A rung's trials as ``promotion`` reads them, from their metrics records (by trial id);
    with ``points`` (by trial id), their parameters too (``promote: predicted`` needs them)."""
    rows = [
        {
            "trial_id": trial_id,
            "rung": rung,
            "step": step,
            "status": record.get("status") or "ok",
            **{name: record.get(name) for name in objectives},
            **(dict(points[trial_id]) if points else {}),
        }
        for trial_id, record in records.items()
    ]
    extra = list(dict.fromkeys(k for p in (points or {}).values() for k in p if k not in objectives))
    return pd.DataFrame(rows, columns=["trial_id", "rung", "step", "status", *objectives, *extra])


def successive_halving(
    trial_ids: Sequence[str],
    schedule: EarlyStopping,
    max_steps: int,
    objectives: Mapping[str, str],
    train: Callable[[str, int], Mapping[str, Any]],
    points: Mapping[str, Mapping[str, Any]] | None = None,
    reference: Sequence[Mapping[str, Any]] = (),
) -> dict[str, dict]:
    """One round's rungs in one process (what the workflow's train_rung and promote jobs do
    through files; benchmarks use this): ``train(trial_id, step)`` gives a trial's metrics
    after ``step`` steps; ``points`` and ``reference`` as ``promotion`` needs them for
    ``promote: predicted`` and ``multi_fidelity`` (the trials' parameters by id; complete
    curves). Returns each trial's metrics at the highest rung it reached, with
    status ``stopped`` where it was not promoted past a rung (a failed one stays failed)."""
    steps = schedule.rung_steps(max_steps)
    alive = list(trial_ids)
    outcome: dict[str, dict] = {}
    for rung, step in enumerate(steps):
        records = {trial_id: dict(train(trial_id, step)) for trial_id in alive}
        outcome.update(records)
        if rung == len(steps) - 1:
            break
        decided = promotion(
            rung_results(records, objectives, rung, step, points),
            objectives,
            schedule.n_keep(len(alive)),
            schedule.promote,
            reference,
        )
        alive = decided.loc[decided["promoted"], "trial_id"].tolist()
        for trial_id in decided.loc[~decided["promoted"], "trial_id"]:
            if (outcome[trial_id].get("status") or "ok") == "ok":
                outcome[trial_id]["status"] = STOPPED
    return {trial_id: outcome[trial_id] for trial_id in trial_ids}
